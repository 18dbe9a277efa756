"""Where the compiled training step spends its time: a profiler trace, grouped by what each op does.

    python -m resjax.bench.profile --row resnet20 --steps 3 --out runs/profile_resnet20

Builds a bench row's step exactly as ``python -m resjax.bench`` measures it, runs it under
``jax.profiler.trace`` and reads the trace back: every event named after an instruction of the
compiled HLO is attributed to a kind, from the instruction's opcode or, for a fusion, from what its
fused computation contains (a dot: matmul; a concatenate, pad, copy or transpose: data movement;
a reduce: reduction; else elementwise). Prints and writes ``profile.md`` (milliseconds per step and
share of op time by kind, then the slowest instructions); the raw trace stays in ``OUT`` for
TensorBoard's or Perfetto's viewers. Op time is the sum of the ops' own durations: close to the
step's wall time on CPU, above it where XLA runs independent ops side by side.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
import time

import jax

from resjax.bench import rows, step
from resjax.errors import UserError

# Fusion kinds, by the first of these ops their fused computation contains.
FUSION_KINDS = (("dot(", "matmul"), ("convolution(", "convolution"),
                ("concatenate(", "data movement"), ("pad(", "data movement"),
                ("dynamic-update-slice(", "dynamic update slice"), ("gather(", "gather"),
                ("scatter(", "scatter"), ("reduce-window(", "reduce window"),
                ("reduce(", "reduction"), ("transpose(", "data movement"),
                ("copy(", "data movement"))
OPCODE_KINDS = {"dot": "matmul", "convolution": "convolution", "copy": "data movement",
                "transpose": "data movement", "concatenate": "data movement",
                "pad": "data movement", "reduce": "reduction", "custom-call": "custom call",
                "dynamic-update-slice": "dynamic update slice", "gather": "gather"}

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", re.M | re.S)
# A result is one shape or a tuple of them (a custom call's several outputs, a multi-output fusion).
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%?([\w.\-]+) = (\((?:[^()]|\([^()]*\))*\)|\S+) ([\w\-]+)\((.*)$", re.M)
# Instructions whose trace events enclose their bodies' instructions: counting them would count
# those twice.
CONTAINERS = ("while", "conditional", "call")


def fusion_bodies(hlo: str) -> dict[str, str]:
  """{fusion instruction name: the text of the computation it calls} of an HLO module's text."""
  computations = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(hlo)}
  out = {}
  for m in _INSTRUCTION.finditer(hlo):
    name, _, opcode, rest = m.groups()
    if opcode == "fusion":
      called = re.search(r"calls=%?([\w.\-]+)", rest)
      out[name] = computations.get(called.group(1), "") if called else ""
  return out


def instruction_kinds(hlo: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (kind, result shape)} for every instruction of an HLO module's text."""
  bodies = fusion_bodies(hlo)
  out = {}
  for m in _INSTRUCTION.finditer(hlo):
    name, shape, opcode, _ = m.groups()
    if opcode in CONTAINERS:
      continue
    kind = OPCODE_KINDS.get(opcode, "elementwise" if opcode == "fusion" else opcode)
    if opcode == "fusion":
      kind = next((k for op, k in FUSION_KINDS if op in bodies[name]), "elementwise")
    out[name] = (kind, shape)
  return out


def trace_events(trace_dir: str | pathlib.Path) -> list[dict]:
  """The complete ('X') events of the newest trace under ``trace_dir``."""
  files = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
  with gzip.open(files[-1]) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  return [e for e in events if e.get("ph") == "X"]


def summarize(events: list[dict], kinds: dict[str, tuple[str, str]], steps: int) -> dict:
  """Per-step milliseconds by kind and by instruction, of the events named after instructions."""
  by_op = collections.Counter()
  for e in events:
    if e.get("name") in kinds:
      by_op[e["name"]] += e.get("dur", 0.0) / 1e3 / steps  # microseconds -> ms per step
  by_kind = collections.Counter()
  for name, ms in by_op.items():
    by_kind[kinds[name][0]] += ms
  return {"total_ms": sum(by_kind.values()), "by_kind": dict(by_kind.most_common()),
          "by_op": dict(by_op.most_common())}


def markdown(summary: dict, kinds: dict, *, title: str, top: int = 15) -> str:
  total = summary["total_ms"] or 1.0
  lines = [f"# {title}", "", f"Op time: {summary['total_ms']:.1f} ms per step.", "",
           "| kind | ms / step | share |", "|---|---|---|"]
  lines += [f"| {k} | {ms:.1f} | {ms / total:.1%} |" for k, ms in summary["by_kind"].items()]
  lines += ["", "| instruction | kind | result | ms / step |", "|---|---|---|---|"]
  for name, ms in list(summary["by_op"].items())[:top]:
    kind, shape = kinds[name]
    lines.append(f"| {name} | {kind} | `{re.sub(r'{[^}]*}', '', shape)}` | {ms:.1f} |")
  return "\n".join(lines) + "\n"


def profile(row_name: str, *, batch: int | None, steps: int, out: str, dtype: str = "float32",
            size: int | None = None) -> dict:
  row = rows.resolve_row(row_name, size)
  built = step.build_step(row, batch or row.batch, dtype)
  run, batch_at, keys, arrays = built.run, built.batch_at, built.aug_keys, built.arrays
  state, window = run(built.state, built.window, batch_at(0), keys, arrays)
  state, window = run(state, window, batch_at(1), keys, arrays)  # warm: first runs allocate
  jax.block_until_ready(window)
  t = time.perf_counter()
  with jax.profiler.trace(out):
    for s in range(steps):
      state, window = run(state, window, batch_at(2 + s), keys, arrays)
    jax.block_until_ready(window)
  wall_ms = (time.perf_counter() - t) * 1e3 / steps
  kinds = instruction_kinds(run.as_text())
  summary = summarize(trace_events(out), kinds, steps)
  summary["wall_ms"] = wall_ms
  title = (f"{row.label}, batch {batch or row.batch}, {dtype}, {jax.devices()[0].device_kind}: "
           f"{wall_ms:.1f} ms per traced step")
  text = markdown(summary, kinds, title=title)
  pathlib.Path(out, "profile.md").write_text(text)
  summary["markdown"] = text
  return summary


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--row", default="resnet20", help=f"one of {', '.join(rows.ROWS)}")
  p.add_argument("--batch", type=int, help="default: the row's")
  p.add_argument("--size", type=int, help="image side instead of the row's")
  p.add_argument("--steps", type=int, default=3, help="traced steps")
  p.add_argument("--dtype", default="float32", choices=rows.DTYPES)
  p.add_argument("--out", required=True, help="folder for the trace and profile.md")
  args = p.parse_args(argv)
  try:
    summary = profile(args.row, batch=args.batch, steps=args.steps, out=args.out,
                      dtype=args.dtype, size=args.size)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(summary["markdown"])
  return 0


if __name__ == "__main__":
  sys.exit(main())
