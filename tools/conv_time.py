"""Convolution time in one CPU training step, resjax against PyTorch eager, read off oneDNN.

Both frameworks convolve with oneDNN on CPU (resjax through ``resjax.kernels``, PyTorch through its
own build), and oneDNN times every primitive it runs when ``ONEDNN_VERBOSE`` is on. This script
runs a bench row's step in each framework in a child process of its own (two warm-up steps, then
one step with the verbose log on), sums the log by primitive and direction, and prints the
milliseconds next to the step's own: the convolutions' share of each step, and what is left for
everything else (BatchNorm, ReLU, the adds, the optimizer, the scan's bookkeeping).

    python tools/conv_time.py [--row resnet110] [--batch 128]

Needs PyTorch and a built kernel (``python -m resjax.kernels build``). One step is one sample:
on a shared machine, run it more than once.
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import time

MARK, END = "CONV_TIME_MARK", "CONV_TIME_END"


def child_resjax(row_name: str, batch: int) -> None:
  import jax

  from resjax.bench import rows, step
  s = step.build_step(rows.ROWS[row_name], batch)
  state, window = s.state, s.window
  for i in range(2):
    state, window = s.run(state, window, s.batch_at(i), s.aug_keys, s.arrays)
    jax.block_until_ready(window)
  print(MARK, flush=True)
  t = time.perf_counter()
  state, window = s.run(state, window, s.batch_at(2), s.aug_keys, s.arrays)
  jax.block_until_ready(window)
  print(END, json.dumps({"step_ms": 1e3 * (time.perf_counter() - t),
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
    t = time.perf_counter()
    float(step(images, labels, torch.arange(2 * batch, 3 * batch)))
    step_ms = 1e3 * (time.perf_counter() - t)
  print(END, json.dumps({"step_ms": step_ms}), flush=True)


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
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--child", choices=("resjax", "torch"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    (child_resjax if args.child == "resjax" else child_torch)(args.row, args.batch)
    return 0
  env = dict(os.environ, ONEDNN_VERBOSE="1")
  results = {}
  for who in ("resjax", "torch"):
    if who == "torch":
      env["ONEDNN_VERBOSE"] = "0"  # PyTorch's log goes on inside the step only
    out = subprocess.run([sys.executable, __file__, "--row", args.row, "--batch",
                          str(args.batch), "--child", who], env=env, capture_output=True,
                         text=True)
    if out.returncode:
      print(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode,
            file=sys.stderr)
      return 2
    results[who] = summarize(out.stdout)
  print(f"{args.row}, batch {args.batch}: one training step, oneDNN's verbose log (ms)\n")
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
    rows_out.append((who, record["step_ms"], onednn))
  print("\n| framework | step ms | oneDNN ms | share | rest ms |")
  print("|---|---|---|---|---|")
  for who, step_ms, onednn in rows_out:
    print(f"| {who} | {step_ms:.1f} | {onednn:.1f} | {onednn / step_ms:.0%} | "
          f"{step_ms - onednn:.1f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
