"""The GPU figures in one command: ResNet-110 (CIFAR, batch 128), ImageNet ResNet-50 (224, batch
256) and GPT-2 small (T=1024, batch 16) training at float32 and bfloat16, in resjax and in PyTorch
(eager; torch.compile while time is left), as one markdown table with the date and the device.

    python3 tools/gpu_bench.py --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log"   # GPU: ~7 minutes
    python tools/gpu_bench.py --dry-run --out /tmp/gpu_bench          # CPU, tiny shapes (below)
    python tools/gpu_bench.py --fetch-wheels      # here, first: wheels of what the GPU image lacks
    python tools/gpu_bench.py --recount DIR/gpu_bench.json   # any machine: count FLOPs again

Every measurement is ``python -m resjax.bench``'s own (one child process each: its rows, steps,
columns and MFU; see resjax.bench.cli); this script orders them, caps their time and gathers them.
It prints the device and the versions, measures resjax and PyTorch eager for every row and dtype
(bf16 first), then torch.compile, each measurement capped at ``CAP_S`` and none started once the
budget (``--budget``) is spent; the table names what did not run, and the log holds the last lines
of a failed measurement's stderr (a compiler's abort names its cause above its stack trace). After
each measurement OUT holds ``gpu_bench.json`` (the bench's ``--json`` format: ``python -m
resjax.bench --merge OUT/gpu_bench.json`` prints the table again) and ``gpu_bench.md``, so a run
cut short keeps what it measured.

The GPU image holds JAX, flax, optax, orbax and PyTorch, but not ml_collections, and nothing can
be fetched there. ``--fetch-wheels`` saves the wheels of ``FETCH``, at this environment's
versions, into ``.whl``; carry that folder and the script installs from it, into a folder of its
own, only what the machine lacks or has too old.

``--dry-run`` runs the same plan on the CPU at tiny shapes (``DRY_SHAPES``), one step each: a
check of the code path, not a measurement (about 8 minutes on 2 cores, most of it compiling;
``--rows gpt2 --dtypes float32 --no-torch-compile``: half a minute).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

# After the path: the GPU machine gets a copy of the tree, not an installed resjax.
from resjax.bench import cli, rows  # noqa: E402
from resjax.errors import ConfigError, UserError  # noqa: E402

ROWS = ("resnet110", "resnet50", "gpt2")
DTYPES = ("bfloat16", "float32")  # in the order measured
# torch.compile's order: the quickest to compile first (a whole-step graph of 110 layers is slow).
COMPILE_ORDER = ("gpt2", "resnet50", "resnet110")
# Seconds one measurement may take on the GPU (process start, init, compile, FLOP count, steps),
# and the least left of the budget for one to start.
CAP_S = {"resjax": 150.0, "torch-eager": 90.0, "torch-compile": 180.0}
MIN_START_S = {"resjax": 30.0, "torch-eager": 15.0, "torch-compile": 45.0}
# --dry-run: (--size, batch) per row; ResNet-50 keeps a 1x1 map after its five halvings at 32.
DRY_SHAPES = {"resnet110": (8, 2), "resnet50": (32, 2), "gpt2": (16, 2)}
# What the children import, by distribution, with the least version resjax runs on.
REQUIRES = (("ml-collections", None), ("flax", (0, 12)), ("optax", None),
            ("orbax-checkpoint", None), ("etils", None), ("absl-py", None))
FETCH = ("ml-collections", "flax")  # where the GPU image may fall short (KINDS.md's list)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
VERSIONS = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
            "orbax-checkpoint", "ml-collections", "numpy", "torch", "triton")


# ------------------------------------------------------------------------------------------------
# Packages.
# ------------------------------------------------------------------------------------------------

def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def _at_least(version: str, least: tuple[int, ...]) -> bool:
  parts = []
  for p in version.split(".")[:len(least)]:
    digits = "".join(c for c in p if c.isdigit()) if p[:1].isdigit() else ""
    parts.append(int(digits) if digits else 0)
  return tuple(parts) >= least


def lacking() -> list[str]:
  """Distributions of ``REQUIRES`` this Python lacks or has older than resjax needs."""
  out = []
  for dist, least in REQUIRES:
    v = _version(dist)
    if v is None or (least and not _at_least(v, least)):
      out.append(dist)
  return out


def install_lacking(wheels: pathlib.Path, site: pathlib.Path) -> list[str]:
  """Installs the lacking distributions from ``wheels`` into ``site`` (for the children's path)."""
  need = lacking()
  if not need:
    return []
  files = {d: sorted(wheels.glob(d.replace("-", "_") + "-*.whl")) for d in need}
  absent = [d for d, f in files.items() if not f]
  if absent:
    raise UserError(f"{', '.join(absent)} missing or too old here and no wheel of it in {wheels}: "
                    "run python tools/gpu_bench.py --fetch-wheels where the package index is "
                    f"reachable, and bring {wheels.name} along")
  site.mkdir(parents=True, exist_ok=True)
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                  "--no-compile", "--upgrade", "--target", str(site),
                  *(str(f[-1]) for f in files.values())], check=True)
  return need


def fetch_wheels(dest: pathlib.Path) -> int:
  """Downloads ``FETCH`` at this environment's versions (the ones tested here) into ``dest``."""
  platforms = [a for p in PLATFORMS for a in ("--platform", p)]
  for dist in FETCH:
    v = _version(dist)
    if v is None:
      raise UserError(f"{dist} is not installed here, so its tested version is unknown: "
                      "run --fetch-wheels from resjax's own environment")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                    *platforms, "-d", str(dest), f"{dist}=={v}"], check=True)
  print(f"{dest}: {', '.join(sorted(p.name for p in dest.glob('*.whl')))}")
  return 0


# ------------------------------------------------------------------------------------------------
# The machine.
# ------------------------------------------------------------------------------------------------

def _run(cmd: list[str], env: dict | None = None) -> tuple[int, str, str]:
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
  except (OSError, subprocess.TimeoutExpired) as e:
    return 1, "", str(e)
  return p.returncode, p.stdout.strip(), p.stderr.strip()


def _git_commit() -> str:
  code, out, _ = _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
  if code or not out:
    return "unknown (no git checkout)"
  _, changes, _ = _run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
  return out + (" with uncommitted changes" if changes else "")


def describe_machine(env: dict) -> dict:
  """Versions, the GPU as nvidia-smi and PyTorch see it, and JAX's backend and device."""
  info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "python": platform.python_version(), "commit": _git_commit(),
          "versions": {d: v for d in VERSIONS if (v := _version(d))}}
  if shutil.which("nvidia-smi"):
    _, out, _ = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                      "--format=csv,noheader"])
    info["nvidia_smi"] = out
  info["xla_flags"] = env.get("XLA_FLAGS", "")  # the children's, a workaround included
  code = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({"
          "'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version(), "
          "'gpu': torch.cuda.get_device_name() if c else None}))")
  rc, out, err = _run([sys.executable, "-c", code], env)
  info["torch"] = json.loads(out.splitlines()[-1]) if rc == 0 else {"error": _last(err)}
  code = ("import json, jax; d = jax.devices()[0]; print(json.dumps({'backend': "
          "jax.default_backend(), 'kind': d.device_kind, 'jax': jax.__version__}))")
  rc, out, err = _run([sys.executable, "-c", code], env)
  if rc:
    raise UserError(f"JAX does not start here ({_last(err)}): check the packages above")
  info["device"] = json.loads(out.splitlines()[-1])
  return info


def _last(text: str) -> str:
  lines = [l for l in text.splitlines() if l.strip()]
  return lines[-1] if lines else "no message"


def header_lines(info: dict, argv: list[str] | None) -> list[str]:
  d, t, v = info["device"], info["torch"], info["versions"]
  torch_line = (f"torch {v.get('torch', '?')} (CUDA {t.get('cuda')}, cuDNN {t.get('cudnn')})"
                if "error" not in t else f"PyTorch does not start: {t['error']}")
  pkgs = ", ".join(f"{k} {x}" for k, x in v.items() if k != "torch")
  title = f"# resjax and PyTorch training steps on {d['kind']} ({d['backend']}), {info['date']}"
  return [title, "",
          (f"`python tools/gpu_bench.py {' '.join(argv)}`" if argv is not None else
           "`python tools/gpu_bench.py` (its arguments not recorded)")
          + f" at commit {info['commit']}; Python "
          f"{info['python']}, {pkgs}; {torch_line}"
          + (f"; nvidia-smi: {info['nvidia_smi']}" if info.get("nvidia_smi") else "")
          + (f"; XLA_FLAGS={info['xla_flags']}" if info.get("xla_flags") else "") + ".", "",
          "float32 rows may use TF32 tensor cores in both frameworks (XLA's default precision; "
          "cuDNN's default for PyTorch's convolutions, and the GPT twin sets matrix multiplies to "
          "match); MFU divides by the dense bf16 peak at both dtypes. Tokens/s: the GPT-2 rows' "
          "examples/s times their context.", ""]


# ------------------------------------------------------------------------------------------------
# The plan and the run.
# ------------------------------------------------------------------------------------------------

def plan(names: list[str], dtypes: list[str], torch_compile: bool) -> list[tuple[str, str, str]]:
  """(row, dtype, impl) in the order measured: resjax and eager for every row and dtype, bf16
  first, then torch.compile (slowest to compile, so the first left out when time runs short)."""
  twins = lambda n: rows.ROWS[n].torch is not None
  order = [d for d in DTYPES if d in dtypes]
  first = [(n, d, i) for d in order for n in names
           for i in ("resjax", "torch-eager") if i == "resjax" or twins(n)]
  by_cost = sorted(names, key=lambda n: COMPILE_ORDER.index(n) if n in COMPILE_ORDER else 99)
  compiled = [(n, d, "torch-compile") for d in order for n in by_cost if twins(n)]
  return first + (compiled if torch_compile else [])


def child_args(name: str, dtype: str, impl: str, steps: int, dry: bool) -> list[str]:
  row = rows.ROWS[name]
  size, batch = DRY_SHAPES.get(name, (None, 2)) if dry else (None, row.batch)
  return (["--one", f"{name}:{dtype}:{impl}", "--batch", str(batch), "--steps", str(steps),
           "--torch-layout", "channels_last"] + (["--size", str(size)] if size else []))


def write_outputs(out: pathlib.Path, info: dict, args: dict, names, dtypes, runs: dict,
                  skipped: list[str], argv: list[str]) -> str:
  """gpu_bench.json (the bench's --json format, plus the machine) and gpu_bench.md, from the runs
  so far; returns the markdown."""
  measured = [{"row": n, "dtype": d, "runs": runs[(n, d)]} for n in names for d in reversed(DTYPES)
              if d in dtypes and runs.get((n, d))]
  raw = out / "gpu_bench.json"
  raw.write_text(json.dumps({"device": info["device"], "args": args, "machine": info,
                             "argv": argv, "skipped": skipped, "rows": measured}, indent=1))
  return markdown(raw)


def markdown(raw: pathlib.Path) -> str:
  """gpu_bench.md beside ``raw`` (a gpu_bench.json), written from it; returns the markdown."""
  data = json.loads(raw.read_text())
  info, args = data["machine"], data["args"]
  text = "\n".join(header_lines(info, data.get("argv"))) + "\n"
  if info.get("recounted"):
    text += (f"FLOPs per example: counted again by `python tools/gpu_bench.py --recount` at "
             f"commit {info['recounted']}; the run's own count is each result's "
             "`flops_per_example_as_measured`.\n\n")
  if data["rows"]:
    text += cli.report(*cli.merge([str(raw)]), torch_version=info["versions"].get("torch"))
  if data.get("skipped"):
    text += (("\n" if data["rows"] else "") + f"Not measured: the budget of {args['budget']:.0f} "
             f"s was spent before {', '.join(data['skipped'])}.\n")
  (raw.parent / "gpu_bench.md").write_text(text)
  return text


def recount(raw: pathlib.Path) -> str:
  """Counts every resjax measurement's FLOPs per example in ``raw`` again, here and with this
  resjax, and rewrites ``raw`` and the gpu_bench.md beside it. Until this option came, resjax
  asked XLA:GPU's compiled program, which leaves out the convolutions and matmuls it hands to
  cuDNN and cuBLAS: ResNet-50's count came out at 1%, and every MFU with it."""
  from resjax.bench import step  # JAX, and only here: the GPU run's own process never starts it

  data = json.loads(raw.read_text())
  dry = data["args"].get("dry_run", False)
  for entry in data["rows"]:
    measured = [r for r in entry["runs"].get("resjax", []) if "error" not in r]
    if not measured:
      continue
    row = rows.resolve_row(entry["row"], DRY_SHAPES[entry["row"]][0] if dry else None)
    flops = step.row_flops(row, entry["dtype"])  # once per row: every repeat ran the same step
    for r in measured:
      r.setdefault("flops_per_example_as_measured", r.get("flops_per_example"))
      r["flops_per_example"] = flops
  data["machine"]["recounted"] = _git_commit()
  raw.write_text(json.dumps(data, indent=1))
  return markdown(raw)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "runs" / "gpu_bench"),
                 help="folder for gpu_bench.md and gpu_bench.json (default: $OUT)")
  p.add_argument("--rows", default=",".join(ROWS), help=f"any of {', '.join(rows.ROWS)}")
  p.add_argument("--dtypes", default=",".join(DTYPES))
  p.add_argument("--steps", type=int, help="timed steps per measurement (20; --dry-run: 1)")
  p.add_argument("--budget", type=float, default=450.0,
                 help="seconds of measuring, after which no measurement starts")
  p.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: a code check")
  p.add_argument("--wheels", default=str(REPO / ".whl"), help="wheels for what this machine lacks")
  p.add_argument("--fetch-wheels", action="store_true",
                 help="download the wheels of FETCH into --wheels, and stop")
  p.add_argument("--recount", metavar="JSON",
                 help="count the FLOPs of a gpu_bench.json's resjax rows again (any machine), "
                      "rewrite it and its gpu_bench.md, and stop")
  args = p.parse_args(argv)
  wheels = pathlib.Path(args.wheels)
  if args.fetch_wheels:
    return fetch_wheels(wheels)
  if args.recount:
    raw = pathlib.Path(args.recount)
    if not raw.is_file():
      raise UserError(f"{raw} does not exist: give --recount the gpu_bench.json of a run")
    try:
      text = recount(raw)
    except (ValueError, KeyError, TypeError) as e:  # json's errors are ValueErrors
      raise UserError(f"{raw} is not a gpu_bench.json ({type(e).__name__}: {e}): give --recount "
                      "the gpu_bench.json of a run") from None
    print(text)
    return 0

  names = [n.strip() for n in args.rows.split(",") if n.strip()]
  dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
  for n in names:
    rows.resolve_row(n)
  for d in dtypes:
    if d not in DTYPES:
      raise ConfigError(f"unknown dtype {d!r}: use --dtypes with any of {', '.join(DTYPES)}")
  steps = args.steps or (1 if args.dry_run else 20)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  env = cli.child_env(None, malloc=args.dry_run)  # MALLOC_TUNABLES: for XLA:CPU's buffers
  site = pathlib.Path("/tmp/resjax_gpu_bench_site")
  installed = install_lacking(wheels, site)
  path = ([str(site)] if installed else []) + [str(REPO / "src")]
  env["PYTHONPATH"] = os.pathsep.join(path + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  if args.dry_run:
    env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  info = describe_machine(env)
  info["installed_from_wheels"] = installed
  print("\n".join(header_lines(info, argv)), flush=True)
  if info["device"]["backend"] == "cpu" and not args.dry_run:
    raise UserError("JAX sees no GPU here (backend cpu): run on a GPU machine, or add --dry-run "
                    "for a check of the code path on the CPU")

  bench_args = {"repeats": 1, "clock": "wall", "torch_layout": "channels_last", "threads": None,
                "unrolled": False, "default_malloc": not args.dry_run, "steps": steps,
                "budget": args.budget, "dry_run": args.dry_run}
  runs, skipped = {}, []
  start = time.monotonic()
  for name, dtype, impl in plan(names, dtypes, args.torch_compile):
    left = args.budget - (time.monotonic() - start)
    label = f"{name} {dtype} {impl}"
    if left < (1.0 if args.dry_run else MIN_START_S[impl]):
      skipped.append(label)
      print(f"# {label}: not started, {max(left, 0):.0f} s of the budget left", file=sys.stderr)
      continue
    timeout = left if args.dry_run else min(CAP_S[impl], left)
    t = time.monotonic()
    r = cli.run_child(child_args(name, dtype, impl, steps, args.dry_run), env, timeout)
    if "stderr_tail" in r:  # into the log: the cause of a crash is rarely one line
      print("\n".join(f"#   {l}" for l in r.pop("stderr_tail")), file=sys.stderr)
    runs.setdefault((name, dtype), {})[impl] = [r]
    print(f"# {label}: " + (r["error"] if "error" in r else
                            f"{r['examples_per_s']:.1f} ex/s, compile {r['compile_s']:.1f} s, "
                            f"peak {r['peak_gib']:.2f} GiB")
          + f" ({time.monotonic() - t:.0f} s)", file=sys.stderr, flush=True)
    write_outputs(out, info, bench_args, names, dtypes, runs, skipped, argv)
  print(write_outputs(out, info, bench_args, names, dtypes, runs, skipped, argv))
  print(f"# wrote {out / 'gpu_bench.md'} and {out / 'gpu_bench.json'} in "
        f"{time.monotonic() - start:.0f} s", file=sys.stderr)
  return 0


def run() -> int:
  try:
    return main()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(run())
