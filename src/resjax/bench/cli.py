"""Speed of resjax's real training step against the same net and step in PyTorch, on synthetic data.

    python -m resjax.bench                                   # ResNet-20, -110, pre-act -1001
    python -m resjax.bench --rows resnet110 --repeats 3 --threads 1 --clock cpu --out bench.md
    python -m resjax.bench --rows resnet110,resnet50 --dtypes float32,bfloat16   # on a GPU
    python -m resjax.bench --merge a.json b.json --out bench.md   # rows measured separately
    python -m resjax.bench --rows resnet110 --remat none,full     # resjax under two remat policies

A row is a model (``ROWS``) at a batch size and compute dtype. resjax runs ``train.train_step`` as
the trainer does (vmapped over one seed replica, jitted, state donated, data on the device, crop
and flip augmentation inside the step); the reference is the same architecture and step in PyTorch
(``resjax.bench.torch_twin``), eager and under ``torch.compile``. Each measurement runs in its own
subprocess, so its peak memory is its own (``MEMORY``). The implementations alternate
``--repeats`` times, so that a machine shared with other work slows them alike; the table shows
each one's median run and the ratios resjax / PyTorch of examples per second (above 1: resjax is
faster) and of peak memory (below 1: resjax needs less). ``--remat`` measures resjax once per
``config.model.remat`` value given (a line each, against the same PyTorch runs); without it, each
row's own config decides.

Step time is the median of the individually timed steps after warm-up (``--clock cpu``: the
process's CPU time per step, which with ``--threads 1`` does not count time lost to other
processes). Compile time is jit lowering + XLA compilation; for torch.compile, the two warm-up
steps less two steps. FLOPs per example are 3x the forward pass's as XLA's cost analysis counts
them; MFU divides the FLOP/s achieved by the device's dense bf16 peak (``PEAK_TFLOPS``) where known.

bf16 (``--dtypes bfloat16``) computes convolutions, Dense layers and BatchNorm's output in bfloat16
(PyTorch: autocast); BatchNorm's batch statistics and running averages, the parameters and the
optimizer state stay float32. It is on by default only on accelerators: CPUs without bf16 units
emulate it. Children get ``resjax.malloc.environment`` (glibc's tunables, and the block cache
where it is built) unless ``--default-malloc``, and with
``--threads N`` both XLA and PyTorch are pinned to N cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys

from resjax import malloc as malloc_settings
from resjax.bench import rows
from resjax.errors import ConfigError, UserError

IMPLS = ("resjax", "torch-eager", "torch-compile")
TORCH_IMPLS = IMPLS[1:]

# What the peak-memory columns mean; the table's footer says it.
MEMORY = ("peak GiB: on CPU the peak resident set of the measurement's process (ru_maxrss), for "
          "resjax and PyTorch alike: runtime, model, data, compilation (XLA's or torch.compile's) "
          "and the steps; on GPU the allocator's peak. XLA GiB: XLA's own account of resjax's "
          "compiled step (arguments, temporaries, outputs not aliased to donated arguments), "
          "without the runtime; PyTorch has no such account. peak resjax / eager: below 1, resjax "
          "needs less.")


# ------------------------------------------------------------------------------------------------
# The table (the parent process: one subprocess per measurement).
# ------------------------------------------------------------------------------------------------

def torch_available() -> bool:
  return importlib.util.find_spec("torch") is not None


def pin_to_cores(threads: int | None):
  """A preexec_fn confining a child to its first ``threads`` allowed cores: XLA:CPU sizes its thread
  pool by the affinity mask (it has no thread-count flag), and so does OpenMP under PyTorch."""
  if not threads or not hasattr(os, "sched_setaffinity"):
    return None
  cores = sorted(os.sched_getaffinity(0))[:threads]
  return lambda: os.sched_setaffinity(0, cores)


def run_child(args: list[str], env: dict, timeout: float, threads: int | None = None) -> dict:
  cmd = [sys.executable, "-m", "resjax.bench", *args]
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                         preexec_fn=pin_to_cores(threads))
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  if out.returncode:
    return {"error": failure_line(out.stderr, out.returncode),
            "stderr_tail": out.stderr.strip().splitlines()[-STDERR_TAIL:]}
  return json.loads(out.stdout.strip().splitlines()[-1])


STDERR_TAIL = 40  # lines of a failed child's stderr kept in its result
# A native crash prints its cause (an absl fatal log line, a failed check, the signal) above a
# stack trace whose frames ("@ 0x...") say nothing on their own.
_CAUSE = re.compile(r"^(F\d{4} |.*Check failed|\*\*\* SIG|Fatal Python error)")
_FRAME = re.compile(r"^\s*(@\s+0x|\*\*\* Begin|PC: @)")


def failure_line(stderr: str, returncode: int) -> str:
  """The line of a failed child's stderr that names why: a native crash's cause, else its last
  line that is not a stack frame (a Python exception's message)."""
  lines = [l.strip() for l in stderr.splitlines() if l.strip()]
  causes = [l for l in lines if _CAUSE.match(l)]
  if causes:
    return causes[0]
  said = [l for l in lines if not _FRAME.match(l)]
  return said[-1] if said else f"killed (exit code {returncode})"


def median_result(results: list[dict]) -> dict:
  """The run whose examples/s is the median (lower middle) of the successful repeats."""
  ok = sorted((r for r in results if "error" not in r), key=lambda r: r["examples_per_s"])
  if not ok:
    return results[-1]
  best = dict(ok[(len(ok) - 1) // 2])
  best["repeats"] = len(ok)
  best["all_examples_per_s"] = [r["examples_per_s"] for r in ok]
  return best


def _num(x, fmt: str) -> str:
  return "n/a" if x is None else format(x, fmt)


def _cell(r: dict | None, key: str, fmt: str) -> str:
  if r is None:
    return "-"
  if "error" in r:
    return "failed"
  return _num(r.get(key), fmt)


def _ratio(a: dict | None, b: dict | None, key: str = "examples_per_s") -> str:
  if not a or not b or "error" in a or "error" in b or not a.get(key) or not b.get(key):
    return "-"
  return f"{a[key] / b[key]:.2f}x"


def resjax_impl(remat: str | None) -> str:
  """The results' key of resjax under ``remat`` (None: the row's own config)."""
  return "resjax" if remat is None else f"resjax:{remat}"


def _remat_cell(r: dict | None, impl: str) -> str:
  """The remat policy a resjax line ran under: as asked, and what "auto" became."""
  asked = impl.partition(":")[2] or (r or {}).get("remat")
  used = (r or {}).get("remat_used")
  if not asked:
    return "-"
  return asked if used in (None, asked) else f"{asked} ({used})"


SUMMARY_HEADER = ("| model | dtype | batch | remat | resjax ex/s | step ms | compile s | "
                  "GFLOP/ex | TFLOP/s | MFU | torch eager ex/s | torch.compile ex/s | "
                  "resjax / eager | resjax / compile | resjax peak GiB | XLA GiB | "
                  "eager peak GiB | peak resjax / eager |")


def markdown(results: dict, *, peak: float | None) -> str:
  """The summary table (one line per model, dtype and resjax variant) and the PyTorch details, in
  markdown.

  ``results[(row, dtype)][impl]`` is the median measurement of that implementation (or an error);
  ``impl`` is a ``TORCH_IMPLS`` name or ``resjax_impl(remat)``.
  """
  lines = [SUMMARY_HEADER, "|" + "---|" * (SUMMARY_HEADER.count("|") - 1)]
  notes = []
  for (name, dtype), by_impl in results.items():
    row = rows.ROWS[name]
    e, c = (by_impl.get(i) for i in TORCH_IMPLS)
    ok = [r for r in by_impl.values() if r and "error" not in r]
    batch = ok[0]["batch"] if ok else "-"
    for impl in [i for i in by_impl if i not in TORCH_IMPLS] or ["resjax"]:
      j = by_impl.get(impl)
      j_ok = j is not None and "error" not in j
      flops = j.get("flops_per_example") if j_ok else None
      tflops = flops * j["examples_per_s"] / 1e12 if flops else None
      use = rows.mfu(flops, j["examples_per_s"], peak) if flops else None
      lines.append(
          f"| {row.label} | {dtype} | {batch} | {_remat_cell(j, impl)} | "
          f"{_cell(j, 'examples_per_s', '.1f')} | "
          f"{_num(j['step_s'] * 1e3 if j_ok else None, '.1f')} | {_cell(j, 'compile_s', '.1f')} | "
          f"{_num(flops / 1e9 if flops else None, '.3f')} | {_num(tflops, '.3f')} | "
          f"{'n/a' if use is None else f'{use:.1%}'} | "
          f"{_cell(e, 'examples_per_s', '.1f')} | {_cell(c, 'examples_per_s', '.1f')} | "
          f"{_ratio(j, e)} | {_ratio(j, c)} | {_cell(j, 'peak_gib', '.2f')} | "
          f"{_cell(j, 'xla_step_gib', '.2f')} | {_cell(e, 'peak_gib', '.2f')} | "
          f"{_ratio(j, e, 'peak_gib')} |")
    for impl, r in by_impl.items():
      if r and "error" in r:
        notes.append(f"- {row.label} {dtype} {impl} failed: {r['error']}")
  torch_rows = [(n, d, i, r) for (n, d), by_impl in results.items() for i, r in by_impl.items()
                if i in TORCH_IMPLS and r and "error" not in r]
  if torch_rows:
    lines += ["", "| model | dtype | PyTorch | ex/s | step ms | compile s | peak GiB |",
              "|---|---|---|---|---|---|---|"]
    for n, d, i, r in torch_rows:
      lines.append(f"| {rows.ROWS[n].label} | {d} | {i[6:]} | {r['examples_per_s']:.1f} | "
                   f"{r['step_s'] * 1e3:.1f} | {r['compile_s']:.1f} | {r['peak_gib']:.2f} |")
  lines += token_table(results, peak)
  return "\n".join(lines + ([""] + notes if notes else []))


def token_table(results: dict, peak: float | None) -> list[str]:
  """Text rows in tokens per second (examples/s x context) and each implementation's MFU, from
  resjax's FLOPs per example (the same net): markdown lines, none without a text row."""
  lines = []
  for (name, dtype), by_impl in results.items():
    row = rows.ROWS[name]
    if not row.tokens:
      continue
    j = by_impl.get("resjax")
    flops = j.get("flops_per_example") if j and "error" not in j else None
    ok = [r for r in by_impl.values() if r and "error" not in r]
    tokens = ok[0].get("tokens_per_example", row.tokens) if ok else row.tokens  # --size: fewer
    tok, use = [], []
    for impl in IMPLS:
      r = by_impl.get(impl)
      if r is None or "error" in r:
        tok.append(_cell(r, "examples_per_s", ".1f"))
        use.append("-")
        continue
      tok.append(f"{r['examples_per_s'] * tokens:,.0f}")
      u = rows.mfu(flops, r["examples_per_s"], peak) if flops else None
      use.append("n/a" if u is None else f"{u:.1%}")
    lines.append(f"| {row.label} | {dtype} | {tokens} | {' | '.join(tok + use)} |")
  if not lines:
    return []
  return ["", "| model | dtype | tokens/example | resjax tok/s | torch eager tok/s | "
          "torch.compile tok/s | resjax MFU | eager MFU | compile MFU |",
          "|---|---|---|---|---|---|---|---|---|", *lines]


def compile_ratio(results: dict, deep: str = "resnet1001", shallow: str = "resnet110") -> float | None:
  """Compile time of the deep row over the shallow one (fp32, resjax, the first variant both
  have): scan keeps it near 1."""
  a, b = results.get((deep, "float32"), {}), results.get((shallow, "float32"), {})
  both = [i for i in a if i not in TORCH_IMPLS and i in b]
  if not both:
    return None
  a, b = a[both[0]], b[both[0]]
  if "error" in a or "error" in b:
    return None
  return a["compile_s"] / b["compile_s"]


def probe_device(env: dict) -> dict:
  """The backend and device kind, asked of a subprocess (this process leaves the device alone)."""
  code = ("import json, jax; d = jax.devices()[0]; "
          "print(json.dumps({'backend': jax.default_backend(), 'kind': d.device_kind, "
          "'jax': jax.__version__}))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
  if out.returncode:
    return {"backend": "unknown", "kind": "unknown", "jax": "?"}
  return json.loads(out.stdout.strip().splitlines()[-1])


# The children run under resjax.malloc's settings (see there), resjax and PyTorch alike: glibc's
# tunables, and the block cache where it is built.
MALLOC_TUNABLES = malloc_settings.TUNABLES


def child_env(threads: int | None, malloc: bool = True) -> dict:
  """The children's environment: the malloc settings above, for resjax and PyTorch alike."""
  env = dict(os.environ)
  if malloc and malloc_settings.ENV not in env:
    env = malloc_settings.environment(env)
  if threads:
    env["OMP_NUM_THREADS"] = str(threads)
  return env


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m resjax.bench",
                              description=__doc__.splitlines()[0])
  p.add_argument("--rows", default=",".join(rows.DEFAULT_ROWS),
                 help=f"any of {', '.join(rows.ROWS)}")
  p.add_argument("--batch", type=int, help="default: each row's (128 for CIFAR; see rows.py)")
  p.add_argument("--size", type=int, help="image side instead of the row's; a text row's context "
                 "and width, 2 blocks (e.g. 8 or 16: a quick check)")
  p.add_argument("--steps", type=int, help="timed steps per measurement (default 10; see rows.py)")
  p.add_argument("--repeats", type=int, default=1, help="alternating runs of each implementation")
  p.add_argument("--dtypes", default="auto", help="float32,bfloat16; auto: bf16 on accelerators")
  p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=None,
                 help="also measure PyTorch (default: when it is installed)")
  p.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--torch-layout", choices=("channels_last", "nchw"), default="channels_last",
                 help="PyTorch's memory format (channels_last: faster on CPU and tensor cores)")
  p.add_argument("--threads", type=int,
                 help="CPU cores for XLA and PyTorch (children pinned to them; default: all)")
  p.add_argument("--unrolled", action="store_true", help="a Python loop instead of lax.scan")
  p.add_argument("--remat", help="config.model.remat values, comma-separated (e.g. none,full): "
                                 "resjax once per value (default: each row's own)")
  p.add_argument("--conv-impl", choices=("auto", "im2col", "onednn", "xla"),
                 help="override conv_impl")
  p.add_argument("--default-malloc", action="store_true",
                 help="leave malloc as it is: no MALLOC_TUNABLES, no block cache")
  p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                 help="cpu: time steps by the process's CPU time (with --threads 1, robust to a "
                      "machine shared with other work)")
  p.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement")
  p.add_argument("--out", help="also write the markdown here")
  p.add_argument("--json", help="also write every measurement (all repeats) here")
  p.add_argument("--merge", nargs="+", metavar="JSON",
                 help="measure nothing: one table from earlier --json files (rows run separately)")
  p.add_argument("--one", help=argparse.SUPPRESS)  # child: ROW:DTYPE:IMPL, prints JSON
  args = p.parse_args(argv)

  if args.one:
    # Only a child imports JAX (and PyTorch): the parent leaves the device to the measurements.
    from resjax.bench import step
    name, dtype, impl = args.one.split(":", 2)
    row = rows.resolve_row(name, args.size)
    if impl.startswith("resjax"):
      remat = impl.partition(":")[2] or None
      r = step.measure_resjax(row, args.batch, args.steps, dtype, scan=not args.unrolled,
                              conv_impl=args.conv_impl, remat=remat)
    else:
      r = step.measure_torch(row, args.batch, args.steps, dtype, impl.split("-")[1], args.threads,
                        args.torch_layout == "channels_last")
    print(json.dumps(r))
    return 0

  if args.merge:
    return emit(report(*merge(args.merge)), args.out)

  names = [n.strip() for n in args.rows.split(",") if n.strip()]
  for n in names:
    rows.resolve_row(n)
  env = child_env(args.threads, malloc=not args.default_malloc)
  device = probe_device(env)
  device["block_cache"] = malloc_settings.uses_block_cache(env)
  on_cpu = device["backend"] == "cpu"
  dtypes = ["float32"] if on_cpu else list(rows.DTYPES)
  if args.dtypes != "auto":
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    for d in dtypes:
      if d not in rows.DTYPES:
        raise ConfigError(f"unknown dtype {d!r}: use --dtypes with any of {', '.join(rows.DTYPES)}")
  use_torch = torch_available() if args.torch is None else args.torch
  if use_torch and not torch_available():
    raise ConfigError("PyTorch is not installed: pip install -e '.[bench]' (or run with --no-torch)")
  remats = [None] if args.remat is None else check_remats(args.remat)
  impls = [resjax_impl(r) for r in remats]
  impls += (["torch-eager"] + ["torch-compile"] * args.torch_compile) * use_torch
  common = ["--size", str(args.size)] if args.size else []
  common += ["--threads", str(args.threads)] if args.threads else []
  common += ["--torch-layout", args.torch_layout]
  common += ["--unrolled"] * args.unrolled + (["--conv-impl", args.conv_impl] if args.conv_impl else [])

  results, raw = {}, []
  for name in names:
    for dtype in dtypes:
      row = rows.ROWS[name]
      batch = args.batch or (on_cpu and row.cpu_batch) or row.batch
      steps = args.steps or (on_cpu and row.cpu_steps) or 10
      sizes = ["--batch", str(batch), "--steps", str(steps)]
      skip = {"torch-compile"} if on_cpu and not row.cpu_torch_compile else set()
      runs = {impl: [] for impl in impls
              if impl not in skip and (impl not in TORCH_IMPLS or row.torch is not None)}
      for _ in range(args.repeats):
        for impl in runs:
          r = run_child(["--one", f"{name}:{dtype}:{impl}", *sizes, *common], env, args.timeout,
                        args.threads)
          if args.clock == "cpu" and "error" not in r:
            r = {**r, "step_s": r["cpu_step_s"], "examples_per_s": r["batch"] / r["cpu_step_s"]}
          runs[impl].append(r)
          print(f"# {name} {dtype} {impl}: "
                + (r["error"] if "error" in r else f"{r['examples_per_s']:.1f} ex/s"),
                file=sys.stderr, flush=True)
      results[(name, dtype)] = {impl: median_result(rs) for impl, rs in runs.items()}
      raw.append({"row": name, "dtype": dtype, "runs": runs})
      if args.json:
        with open(args.json, "w") as f:
          json.dump({"device": device, "args": vars(args), "rows": raw}, f, indent=1)

  return emit(report(results, device, vars(args)), args.out)


def check_remats(text: str) -> list[str]:
  """The --remat list, each a config.model.remat value."""
  from resjax.models.layers import REMATS  # imports JAX, but starts no backend
  remats = [r.strip() for r in text.split(",") if r.strip()]
  bad = [r for r in remats if r not in REMATS]
  if bad or not remats:
    raise ConfigError(f"--remat={text}: give config.model.remat values, comma-separated, from "
                      f"{', '.join(REMATS)}")
  return remats


def emit(text: str, out: str | None) -> int:
  """Prints the table and, with ``--out``, writes it there."""
  print(text)
  if out:
    with open(out, "w") as f:
      f.write(text)
  return 0


def report(results: dict, device: dict, args: dict, torch_version: str | None = None) -> str:
  """The markdown table of ``results`` with a footer saying how they were measured (PyTorch's
  version: ``torch_version``, else the one installed here)."""
  peak = rows.peak_tflops(device["kind"])
  table = markdown(results, peak=peak)
  ratio = compile_ratio(results)
  measured_torch = any(i in TORCH_IMPLS for by_impl in results.values() for i in by_impl)
  torch_line = (f"PyTorch {torch_version}" if measured_torch and torch_version else
                f"PyTorch {_torch_version()}" if measured_torch and torch_available() else
                "PyTorch: not measured" + ("" if torch_available() else
                                           "; install it with pip install -e '.[bench]'"))
  threads = args.get("threads") or "default"
  footer = [f"Device: {device['kind']} ({device['backend']}), jax {device['jax']}, {torch_line}; "
            f"median of each run's steps ({args.get('clock', 'wall')} clock), median of "
            f"{args.get('repeats', 1)} alternating run(s); threads: {threads}; "
            f"peak bf16 TFLOP/s: {_num(peak, '.0f')}; scan: {not args.get('unrolled', False)}; "
            f"PyTorch layout: {args.get('torch_layout', 'channels_last')}; malloc: "
            f"{'default' if args.get('default_malloc') else 'MALLOC_TUNABLES'}"
            f"{' and the block cache' if device.get('block_cache') else ''}."]
  convs = sorted({r["conv_impl"] for by_impl in results.values() for r in by_impl.values()
                  if r and r.get("conv_impl")})
  if convs:
    footer.append(f"resjax's convolutions: {', '.join(convs)} (conv_impl; onednn: "
                  f"resjax.kernels, im2col: matrix multiplies, xla: XLA's convolution).")
  footer.append(MEMORY)
  if ratio is not None:
    footer.append(f"Compile time, pre-act ResNet-1001 / ResNet-110: {ratio:.2f}x.")
  return table + "\n\n" + "\n".join(footer) + "\n"


def merge(paths: list[str]) -> tuple[dict, dict, dict]:
  """(results, device, args) of several ``--json`` files, in their order; a row measured in more
  than one file keeps the last. Files from different devices are refused."""
  results, device, args = {}, None, {}
  for path in paths:
    try:
      with open(path) as f:
        data = json.load(f)
      measured, dev = data["rows"], data["device"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ConfigError(f"{path} is not a bench --json file ({e}): rerun the bench with --json "
                        f"{path}") from None
    if device is not None and dev["kind"] != device["kind"]:
      raise ConfigError(f"{path} was measured on {dev['kind']}, not {device['kind']}: merge "
                        f"files from one device only")
    device, args = dev, {**data.get("args", {}), **args}
    for r in measured:
      results[(r["row"], r["dtype"])] = {impl: median_result(rs) for impl, rs in r["runs"].items()}
  return results, device, args


def _torch_version() -> str:
  import torch  # optional ('.[bench]') and seconds to import: only when the footer names it
  return torch.__version__


def cli(argv=None) -> int:
  """``main`` with a user's mistake reported as one line and exit status 2."""
  try:
    return main(argv)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(cli())
