"""Cost of resjax's real training step on synthetic CIFAR-shaped data: init, compile, step, memory.

    python -m resjax.bench --depths 110,1202 --batch 8 --steps 3

Each depth runs in a fresh subprocess so that its peak resident memory (the high-water mark of the
whole process: init, compile and steps) is its own. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(depth: int, batch: int, steps: int, scan: bool, size: int) -> dict:
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  import ml_collections

  from resjax import configs, train
  from resjax.data.images import ImageSplits

  rng = np.random.default_rng(0)
  n = max(batch * 4, 64)
  data = ImageSplits(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                     rng.integers(0, 10, n).astype(np.int32),
                     rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
                     rng.integers(0, 10, batch).astype(np.int32), 10,
                     np.full((size, size, 3), 0.5, np.float32))
  config = ml_collections.ConfigDict(dict(
      model=dict(name="cifar_resnet", depth=depth, unit="basic", placement="post", scan=scan,
                 shortcut=dict(name="identity", option="A")),
      batch_size=batch, schedule=dict(unit="iterations", total=64_000, boundaries=(32_000,),
                                      warmup=0),
      optim=dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)))
  dd = train.DeviceData.put(data)
  t = time.perf_counter()
  model = train.build_model(config, data, 0)
  graphdef, params, rest = train.split_model(model)
  tx = train.make_optimizer(config, configs.schedule_steps(config, n))
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "rest": rest,
           "opt": tx.init(params)}
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t
  step_fn = jax.jit(functools.partial(train.train_step, graphdef, tx, mean=dd.mean, pad=4,
                                      flip=True, aug_key=train.key(1)), donate_argnums=(0, 1))
  idx = train.batch_indices(0, 0, n, batch)
  t = time.perf_counter()
  compiled = step_fn.lower(state, train.new_window(), dd.train_images, dd.train_labels,
                           idx).compile()
  compile_s = time.perf_counter() - t
  window = train.new_window()
  state, window = compiled(state, window, dd.train_images, dd.train_labels, idx)
  jax.block_until_ready(window)
  t = time.perf_counter()
  for s in range(steps):
    state, window = compiled(state, window, dd.train_images, dd.train_labels,
                             train.batch_indices(0, s + 1, n, batch))
  jax.block_until_ready(window)
  step_s = (time.perf_counter() - t) / steps
  return {"depth": depth, "batch": batch, "scan": scan, "init_s": init_s, "compile_s": compile_s,
          "step_s": step_s, "examples_per_s": batch / step_s,
          "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
          "backend": jax.default_backend()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--depths", default="110,1202")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--size", type=int, default=32, help="image side (CIFAR: 32)")
  p.add_argument("--unrolled", action="store_true", help="a Python loop instead of lax.scan")
  p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one depth, JSON out
  args = p.parse_args(argv)
  if args.one:
    print(json.dumps(measure(args.one, args.batch, args.steps, not args.unrolled, args.size)))
    return 0
  rows = []
  for depth in [int(d) for d in args.depths.split(",")]:
    cmd = [sys.executable, "-m", "resjax.bench", "--one", str(depth), "--batch", str(args.batch),
           "--steps", str(args.steps), "--size", str(args.size)] + (["--unrolled"] * args.unrolled)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
      rows.append({"depth": depth, "error": (out.stderr.strip().splitlines() or ["killed"])[-1]})
    else:
      rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
  print("| depth | batch | scan | init s | compile s | step s | examples/s | peak RSS GiB |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    if "error" in r:
      print(f"| {r['depth']} | {args.batch} | {not args.unrolled} | failed: {r['error']} |||||")
      continue
    print(f"| {r['depth']} | {r['batch']} | {r['scan']} | {r['init_s']:.1f} | {r['compile_s']:.1f} | "
          f"{r['step_s']:.3f} | {r['examples_per_s']:.1f} | {r['peak_rss_gib']:.2f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
