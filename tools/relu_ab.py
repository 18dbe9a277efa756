"""layers.relu against jax.nn.relu in a bench row's training step, paired in one process.

Builds the row's step twice (as ``python -m resjax.bench`` does), once with the models' ReLUs as
``layers.relu`` and once with every one of them ``jax.nn.relu``, then runs the two alternately,
step by step, so that a change in the machine's speed hits both alike. Prints each one's median
step time and the median and quartiles of the per-pair ratio (layers.relu / jax.nn.relu).

    python tools/relu_ab.py [--row resnet20] [--steps 20] [--remat none] [--jax-first]
"""

import argparse
import statistics
import time

import jax

from resjax.bench import rows, step
from resjax.models import layers


def build(row, remat, relu):
  ours, layers.relu = layers.relu, relu
  try:
    s = step.build_step(row, row.batch, remat=remat)
  finally:
    layers.relu = ours
  state, window = s.state, s.window
  for i in range(2):  # warm: first runs allocate
    state, window = s.run(state, window, s.batch_at(i), s.aug_keys, s.arrays)
  jax.block_until_ready(window)
  return [s, state, window, []]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--row", default="resnet20", help="a CIFAR row of resjax.bench")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--remat", default="none")
  p.add_argument("--jax-first", action="store_true", help="run jax.nn.relu's step first in a pair")
  a = p.parse_args()
  row = rows.ROWS[a.row]
  runs = {"layers.relu": build(row, a.remat, layers.relu),
          "jax.nn.relu": build(row, a.remat, lambda x, gate="output": jax.nn.relu(x))}
  order = list(runs)[::-1] if a.jax_first else list(runs)
  for i in range(a.steps):
    for name in order:
      r = runs[name]
      s = r[0]
      t = time.perf_counter()
      r[1], r[2] = s.run(r[1], r[2], s.batch_at(2 + i), s.aug_keys, s.arrays)
      jax.block_until_ready(r[2])
      r[3].append(time.perf_counter() - t)
  ours, theirs = runs["layers.relu"][3], runs["jax.nn.relu"][3]
  ratios = [x / y for x, y in zip(ours, theirs)]
  q1, _, q3 = statistics.quantiles(ratios, n=4)
  print(f"{row.label}, remat {a.remat}, {a.steps} pairs ({order[0]} first): layers.relu "
        f"{statistics.median(ours) * 1e3:.1f} ms, jax.nn.relu {statistics.median(theirs) * 1e3:.1f} "
        f"ms a step; ratio median {statistics.median(ratios):.3f} (quartiles {q1:.3f}-{q3:.3f})")


if __name__ == "__main__":
  main()
