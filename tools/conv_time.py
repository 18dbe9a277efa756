"""Convolution time in one CPU training step, resjax against PyTorch eager, read off oneDNN.

Both frameworks convolve with oneDNN on CPU (resjax through ``resjax.kernels``, PyTorch through its
own build), and oneDNN times every primitive it runs when ``ONEDNN_VERBOSE`` is on. This script
runs a bench row's step in each framework in a child process of its own (two warm-up steps, then
one step with the verbose log on), sums the log by primitive and direction, and prints the
milliseconds next to the step's own: the convolutions' share of each step, and what is left for
everything else (BatchNorm, ReLU, the adds, the optimizer, the scan's bookkeeping).

    python tools/conv_time.py [--row resnet110] [--batch 128] [--remat none]
    python tools/conv_time.py --isolated [--channels 16] [--size 32] [--batch 128]

``--isolated`` times the convolution alone instead: ten 3x3 convolutions chained in one function,
forward, then forward and backward, in each framework (resjax's kernel in a jitted function,
PyTorch's channels-last conv2d), and prints the median milliseconds per convolution. Where the
two agree alone but not inside the step, the difference is the step's, not oneDNN's version.

Both children run under the bench's glibc malloc settings (``resjax.malloc``; ``--default-malloc``:
without them, where resjax's step faults its buffers in again, much of it inside the
convolutions). The step's table adds each process's CPU time and page faults during the step.
Needs PyTorch and a built kernel (``python -m resjax.kernels build``). One step is one sample:
on a shared machine, run it more than once.
"""

import argparse
import collections
import json
import resource
import subprocess
import sys
import time

MARK, END = "CONV_TIME_MARK", "CONV_TIME_END"


def cpu_since(before) -> dict:
  """The process's CPU time (user, system; ms, all threads) and minor page faults since ``before``."""
  now = resource.getrusage(resource.RUSAGE_SELF)
  return {"user_ms": 1e3 * (now.ru_utime - before.ru_utime),
          "sys_ms": 1e3 * (now.ru_stime - before.ru_stime),
          "page_faults": now.ru_minflt - before.ru_minflt}


def child_resjax(row_name: str, batch: int, remat: str | None = None) -> None:
  import jax

  from resjax.bench import rows, step
  s = step.build_step(rows.ROWS[row_name], batch, remat=remat)
  state, window = s.state, s.window
  for i in range(2):
    state, window = s.run(state, window, s.batch_at(i), s.aug_keys, s.arrays)
    jax.block_until_ready(window)
  print(MARK, flush=True)
  t, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
  state, window = s.run(state, window, s.batch_at(2), s.aug_keys, s.arrays)
  jax.block_until_ready(window)
  print(END, json.dumps({"step_ms": 1e3 * (time.perf_counter() - t), **cpu_since(usage),
                         "conv_impl": s.config.model.get("conv_impl", "auto")}), flush=True)


def child_torch(row_name: str, batch: int) -> None:
  import torch

  from resjax.bench import rows, torch_twin
  kw = rows.ROWS[row_name].torch
  torch.manual_seed(0)
  model = torch_twin.ResNet(kw["depth"], unit=kw.get("unit", "basic"),
                            placement=kw.get("placement", "post"), option=kw.get("option", "A"))
  model = model.to(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  step = torch_twin.make_step(model, opt, torch.full((1, 3, 1, 1), 0.5), pad=4,
                              channels_last=True, autocast_dtype=None)
  gen = torch.Generator().manual_seed(0)
  images = torch.randint(0, 256, (4 * batch, 32, 32, 3), dtype=torch.uint8, generator=gen)
  labels = torch.randint(0, 10, (4 * batch,), generator=gen)
  for i in range(2):
    float(step(images, labels, torch.arange(i * batch, (i + 1) * batch)))
  print(MARK, flush=True)
  with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
    t, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    float(step(images, labels, torch.arange(2 * batch, 3 * batch)))
    step_ms = 1e3 * (time.perf_counter() - t)
  print(END, json.dumps({"step_ms": step_ms, **cpu_since(usage)}), flush=True)


CHAIN = 10  # convolutions chained in one isolated measurement


def child_isolated(who: str, batch: int, channels: int, size: int, repeats: int) -> None:
  import statistics

  import numpy as np
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((batch, size, size, channels), np.float32)
  w0 = (0.05 * rng.standard_normal((3, 3, channels, channels))).astype(np.float32)
  if who == "resjax":
    import jax
    import jax.numpy as jnp

    from resjax.kernels.conv import conv

    def chain(x, w):
      for _ in range(CHAIN):
        x = conv(x, w, 1)
      return x

    fwd = jax.jit(chain)
    grad = jax.jit(jax.grad(lambda x, w: 1e-6 * jnp.sum(jnp.square(chain(x, w))), (0, 1)))
    x, w = jnp.asarray(x0), jnp.asarray(w0)
    runs = {"forward": lambda: jax.block_until_ready(fwd(x, w)),
            "forward+backward": lambda: jax.block_until_ready(grad(x, w))}
  else:
    import torch
    cl = torch.channels_last
    x = torch.from_numpy(x0).permute(0, 3, 1, 2).contiguous(memory_format=cl)
    w = torch.from_numpy(w0).permute(3, 2, 0, 1).contiguous(memory_format=cl).requires_grad_()

    def chain(h):
      for _ in range(CHAIN):
        h = torch.nn.functional.conv2d(h, w, padding=1)
      return h

    def forward():
      with torch.no_grad():
        chain(x)

    def forward_backward():
      xg = x.detach().requires_grad_()
      (1e-6 * chain(xg).square().sum()).backward()

    runs = {"forward": forward, "forward+backward": forward_backward}
  for run in runs.values():
    run()  # compile or warm up
  times = {k: [] for k in runs}
  for _ in range(repeats):
    for k, run in runs.items():
      t = time.perf_counter()
      run()
      times[k].append(1e3 * (time.perf_counter() - t) / CHAIN)
  print(END, json.dumps({k: statistics.median(v) for k, v in times.items()}), flush=True)


def child_env(malloc: bool = True) -> dict:
  """Both children's environment: the bench's, with resjax.malloc's glibc settings unless not
  ``malloc``."""
  from resjax.bench import cli
  return cli.child_env(None, malloc=malloc)


def isolated(batch: int, channels: int, size: int, repeats: int, malloc: bool = True) -> int:
  results = {}
  for who in ("resjax", "torch"):
    out = subprocess.run([sys.executable, __file__, "--isolated", "--child", who, "--batch",
                          str(batch), "--channels", str(channels), "--size", str(size),
                          "--repeats", str(repeats)], capture_output=True, text=True,
                         env=child_env(malloc))
    if out.returncode:
      print(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode,
            file=sys.stderr)
      return 2
    results[who] = summarize(out.stdout)[1]
  print(f"3x3 convolution, {channels} channels, {size}x{size}, batch {batch}, {CHAIN} chained: "
        f"median ms per convolution of {repeats}\n")
  print("| | resjax | PyTorch | resjax / PyTorch |\n|---|---|---|---|")
  for k, r in results["resjax"].items():
    t = results["torch"][k]
    print(f"| {k} | {r:.2f} | {t:.2f} | {r / t:.2f} |")
  return 0


def summarize(log: str) -> tuple[dict, dict]:
  """({(primitive, direction): [calls, ms]}, the child's END record) from a child's stdout."""
  on, totals, record = False, collections.defaultdict(lambda: [0, 0.0]), {}
  for line in log.splitlines():
    if line.startswith(MARK):
      on = True
    elif line.startswith(END):
      on, record = False, json.loads(line[len(END):])
    elif on and line.startswith("onednn_verbose") and ",exec," in line:
      f = line.split(",")
      i = f.index("exec")
      key = (f[i + 2], f[i + 4])  # primitive kind, propagation kind
      totals[key][0] += 1
      totals[key][1] += float(f[-1])
  return dict(totals), record


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--row", default="resnet110", help="a CIFAR row of resjax.bench")
  p.add_argument("--remat", help="resjax's config.model.remat (default: the row's own)")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--isolated", action="store_true", help="the convolution alone (see above)")
  p.add_argument("--channels", type=int, default=16, help="--isolated: channels in and out")
  p.add_argument("--size", type=int, default=32, help="--isolated: image side")
  p.add_argument("--repeats", type=int, default=15, help="--isolated: timed runs of each")
  p.add_argument("--default-malloc", action="store_true",
                 help="leave glibc malloc as it is in both children (see resjax.malloc)")
  p.add_argument("--child", choices=("resjax", "torch"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.isolated:
    if args.child:
      child_isolated(args.child, args.batch, args.channels, args.size, args.repeats)
      return 0
    return isolated(args.batch, args.channels, args.size, args.repeats, not args.default_malloc)
  if args.child:
    if args.child == "resjax":
      child_resjax(args.row, args.batch, args.remat)
    else:
      child_torch(args.row, args.batch)
    return 0
  env = dict(child_env(not args.default_malloc), ONEDNN_VERBOSE="1")
  results = {}
  remat = ["--remat", args.remat] if args.remat else []
  for who in ("resjax", "torch"):
    if who == "torch":
      env["ONEDNN_VERBOSE"] = "0"  # PyTorch's log goes on inside the step only
    out = subprocess.run([sys.executable, __file__, "--row", args.row, "--batch",
                          str(args.batch), "--child", who, *remat], env=env,
                         capture_output=True, text=True)
    if out.returncode:
      print(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode,
            file=sys.stderr)
      return 2
    results[who] = summarize(out.stdout)
  remat_name = args.remat or "the row's own"
  print(f"{args.row}, batch {args.batch}, resjax remat {remat_name}: one training step, "
        "oneDNN's verbose log (ms)\n")
  print("| primitive | direction | resjax calls | resjax ms | PyTorch calls | PyTorch ms |")
  print("|---|---|---|---|---|---|")
  keys = sorted(set(results["resjax"][0]) | set(results["torch"][0]))
  for key in keys:
    r, t = results["resjax"][0].get(key, [0, 0.0]), results["torch"][0].get(key, [0, 0.0])
    print(f"| {key[0]} | {key[1]} | {r[0]} | {r[1]:.1f} | {t[0]} | {t[1]:.1f} |")
  rows_out = []
  for who in ("resjax", "torch"):
    totals, record = results[who]
    onednn = sum(ms for _, ms in totals.values())
    rows_out.append((who, record, onednn))
  malloc = "default glibc malloc" if args.default_malloc else "resjax.malloc's settings"
  print(f"\nThe step's wall time, oneDNN's part of it, and the process's CPU time (all threads) and "
        f"minor page faults during it ({malloc}):\n")
  print("| framework | step ms | oneDNN ms | share | rest ms | user CPU ms | system CPU ms | "
        "page faults |")
  print("|---|---|---|---|---|---|---|---|")
  for who, record, onednn in rows_out:
    step_ms = record["step_ms"]
    print(f"| {who} | {step_ms:.1f} | {onednn:.1f} | {onednn / step_ms:.0%} | "
          f"{step_ms - onednn:.1f} | {record['user_ms']:.0f} | {record['sys_ms']:.0f} | "
          f"{record['page_faults']} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
