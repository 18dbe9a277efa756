"""Decode + augment throughput of the ImageNet loader, images/s per host core: grain against the
thread pool it replaced.

    python tools/loader_bench.py                      # 1 and 2 cores; prints a markdown table
    python tools/loader_bench.py --rate 3000          # and the cores that feed 3000 images/s

Synthetic JPEGs of ImageNet's typical sizes (500x375 and 400x500, quality 90, smooth content
with some texture, about ImageNet's bytes per image) go through the training recipe at 224
pixels (scale augmentation, crop, flip, lighting) in batches of --batch. Each row runs in its own
process pinned to its cores with os.sched_setaffinity (worker processes inherit the pinning):
the loader of the commit before grain (`--old`, read from git: ThreadPoolExecutor of N threads,
one batch of prefetch) and today's (N grain worker processes, or 0: in the trainer's process
with a batch prefetched on one thread). After --warmup batches (which start the workers), it
times --batches batches: images/s is their images over the wall time, and images per CPU-second
counts the CPU time of the process and its workers (less sensitive to other load, though a busy
sibling hyperthread still slows it). Each row runs --repeats times and shows its best. "function"
is `train_image` called in a loop, the work without any loader.

The cores a host needs to feed one accelerator is --rate / (images/s per core of the best row).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import pickle
import subprocess
import sys
import tempfile
import time
import types

REPO = pathlib.Path(__file__).resolve().parents[1]
# The last commit whose loader is the thread pool: its imagenet.py is the "old" rows' loader.
OLD_COMMIT = "f926ff0"
SIZES = ((375, 500), (500, 400))  # (height, width): ImageNet's common landscape and portrait.


def synthetic_jpegs(count: int, seed: int = 0) -> list[dict]:
  """`count` records {"image": JPEG bytes, "label"}: smooth colour fields with fine texture."""
  import numpy as np
  from PIL import Image
  rng = np.random.default_rng(seed)
  records = []
  for i in range(count):
    height, width = SIZES[i % len(SIZES)]
    coarse = rng.integers(0, 256, (height // 25, width // 25, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    texture = rng.normal(0, 16, (height, width, 3))
    pixels = np.clip(field + texture, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    records.append({"image": buffer.getvalue(), "label": i % 1000})
  return records


class Records(list):
  """A list of records that also reads several at once, as the TFDS source the old loader
  expects does."""

  def __getitems__(self, keys):
    return [self[k] for k in keys]


def old_loader_module(commit: str):
  """resjax.data.imagenet as of `commit`, its TFDS source replaced by the records given."""
  text = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:src/resjax/data/imagenet.py"],
                        check=True, capture_output=True, text=True).stdout
  module = types.ModuleType(f"resjax_imagenet_{commit}")
  exec(compile(text, f"{commit}:src/resjax/data/imagenet.py", "exec"), module.__dict__)
  return module


def cpu_seconds(pid: int | None = None) -> float:
  """User + system CPU time of process `pid` (this one) and all its descendants, from /proc."""
  pid = pid or os.getpid()
  total = 0.0
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for task in os.listdir(f"/proc/{pid}/task"):
      with open(f"/proc/{pid}/task/{task}/children") as f:
        total += sum(cpu_seconds(int(child)) for child in f.read().split())
  except FileNotFoundError:  # A process that ended meanwhile.
    pass
  return total


def measure(loader: str, workers: int, cores: int, records_path: str, batch: int, batches: int,
            warmup: int, old: str) -> dict:
  """One row, in this process: pins it to `cores` cores, then times the loader."""
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
  import ml_collections
  import numpy as np
  with open(records_path, "rb") as f:
    records = pickle.load(f)
  cfg = ml_collections.ConfigDict(dict(image_size=224, num_workers=workers))
  if loader == "function":
    from resjax.data import imagenet

    def run(step):
      for j in range(batch):
        record = records[(step * batch + j) % len(records)]
        imagenet.train_image(record["image"], np.random.default_rng([step, j]), size=224,
                             short_side_range=(256, 480), lighting_std=0.1)
    close = lambda: None
  elif loader == "old":
    module = old_loader_module(old)
    module.prepare = types.SimpleNamespace(open_data_source=lambda *a, **k: Records(records))
    source = module.ImageNetSource(cfg)
    run, close = lambda step: source.train_batch(0, step, batch), source.close
  else:
    from resjax.data import imagenet
    source = imagenet.ImageNetSource(cfg, records=records)
    run, close = lambda step: source.train_batch(0, step, batch), source.close
  for step in range(warmup):
    run(step)
  cpu, start = cpu_seconds(), time.perf_counter()
  for step in range(warmup, warmup + batches):
    run(step)
  wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
  close()
  images = batch * batches
  return {"loader": loader, "workers": workers, "cores": cores, "images_per_s": images / wall,
          "per_core": images / wall / cores, "per_cpu_s": images / cpu if cpu else float("nan")}


LABELS = {"function": "train_image in a loop (no loader)", "old": "old: thread pool",
          "grain": "grain"}


def table(rows: list[dict]) -> str:
  lines = ["| loader | workers | cores | images/s | images/s per core | images per CPU-s |",
           "|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    workers = {"function": "-", "old": f"{r['workers']} threads"}.get(
        r["loader"], f"{r['workers']} processes" if r["workers"] else "0 (in process)")
    lines.append(f"| {LABELS[r['loader']]} | {workers} | {r['cores']} | {r['images_per_s']:.0f} | "
                 f"{r['per_core']:.0f} | {r['per_cpu_s']:.0f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--cores", default="1,2", help="core counts to pin to, comma-separated")
  parser.add_argument("--images", type=int, default=256, help="synthetic JPEGs (cycled)")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--batches", type=int, default=8, help="timed batches per row")
  parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
  parser.add_argument("--repeats", type=int, default=2, help="runs of each row; the best is shown")
  parser.add_argument("--rate", type=float, default=None,
                      help="an accelerator's training rate, images/s: prints the cores to feed it")
  parser.add_argument("--old", default=OLD_COMMIT, help="the commit of the thread-pool loader")
  parser.add_argument("--measure", help=argparse.SUPPRESS)  # One row, in a child process.
  args = parser.parse_args(argv)
  if args.measure:
    loader, workers, cores, path = args.measure.split(",", 3)
    print(json.dumps(measure(loader, int(workers), int(cores), path, args.batch, args.batches,
                             args.warmup, args.old)))
    return
  cores = [int(c) for c in args.cores.split(",")]
  available = len(os.sched_getaffinity(0))
  if max(cores) > available:
    sys.exit(f"--cores {args.cores} asks for more than the {available} cores this process may "
             "use: lower it")
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "records.pkl")
    records = synthetic_jpegs(args.images)
    with open(path, "wb") as f:
      pickle.dump(records, f)
    kib = sum(len(r["image"]) for r in records) / len(records) / 1024
    plan = [("function", 0, 1)]
    for c in cores:
      plan += [("old", c, c)] + ([("grain", 0, 1)] if c == 1 else []) + [("grain", c, c)]
    runs = {row: [] for row in plan}
    for _ in range(args.repeats):  # Rounds over all rows: slow spells of the machine spread out.
      for loader, workers, c in plan:
        out = subprocess.run(
            [sys.executable, __file__, "--measure", f"{loader},{workers},{c},{path}",
             "--batch", str(args.batch), "--batches", str(args.batches), "--warmup",
             str(args.warmup), "--old", args.old],
            check=True, capture_output=True, text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"})
        runs[(loader, workers, c)].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {runs[(loader, workers, c)][-1]}", file=sys.stderr, flush=True)
    rows = [{**measured[0], **{k: max(m[k] for m in measured)
                               for k in ("images_per_s", "per_core", "per_cpu_s")}}
            for measured in runs.values()]
  load = os.getloadavg()[0]
  print(f"{args.images} synthetic JPEGs ({kib:.0f} KiB mean, {SIZES[0][1]}x{SIZES[0][0]} and "
        f"{SIZES[1][1]}x{SIZES[1][0]}, quality 90), train recipe at 224, batch {args.batch}, "
        f"{args.batches} timed batches a row, best of {args.repeats}; load average {load:.1f} on "
        f"{os.cpu_count()} CPUs.\n")
  print(table(rows))
  best = max((r for r in rows if r["loader"] == "grain"), key=lambda r: r["per_core"])
  per_cpu = max(r["per_cpu_s"] for r in rows if r["loader"] == "grain")
  if args.rate:
    print(f"\nTo feed {args.rate:.0f} images/s: {args.rate / best['per_core']:.1f} host cores at "
          f"grain's best {best['per_core']:.0f} images/s per core ({args.rate / per_cpu:.1f} at "
          f"its best {per_cpu:.0f} images per CPU-second).")
  else:
    print(f"\nHost cores to feed R images/s: R / {best['per_core']:.0f} (grain's best images/s "
          f"per core; R / {per_cpu:.0f} by CPU time).")


if __name__ == "__main__":
  main()
