"""XLA:CPU's elementwise loop over a bool operand: a select on a saved mask against one on a compare.

A minimal reproduction for an upstream report, JAX alone (no resjax). ReLU's backward pass under
autodiff is ``where(mask, g, 0)`` with ``mask = x > 0`` saved by the forward pass as a bool array.
This script times, on one float32 map (batch B, H x W, C channels), five jitted loops that each
read the map once and write it once:

  multiply      g * 1.01                      (the reference: a vectorised loop)
  mask select   where(mask, g, 0)             (mask: a bool array, as autodiff saves it)
  mask multiply g * mask.astype(float32)      (the same bytes read, the bool converted first)
  mask AND      g's bits AND (0 - mask)         (the bool mask as integer bits, as layers.relu applies it)
  output select where(y > 0, g, 0)            (y: the float32 ReLU output, as layers.relu reads it)

checks that the four gated ones agree (bit for bit, but for mask multiply's -0.0 where g < 0),
and prints the median of each. Run it pinned to one core (``taskset -c 0``) for a figure that
does not depend on the thread pool.

    python tools/bool_select_repro.py [--batch 128] [--size 32] [--channels 16] [--repeats 30]
"""

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--channels", type=int, default=16)
  p.add_argument("--repeats", type=int, default=30)
  a = p.parse_args()
  kx, kg = jax.random.split(jax.random.key(0))
  shape = (a.batch, a.size, a.size, a.channels)
  y = jax.nn.relu(jax.random.normal(kx, shape, jnp.float32))
  g = jax.random.normal(kg, shape, jnp.float32)
  mask = y > 0
  fns = {
      "multiply": jax.jit(lambda g, y, m: g * 1.01),
      "mask select": jax.jit(lambda g, y, m: jnp.where(m, g, 0.0)),
      "mask multiply": jax.jit(lambda g, y, m: g * m.astype(jnp.float32)),
      "mask AND": jax.jit(lambda g, y, m: jax.lax.bitcast_convert_type(
          jax.lax.bitcast_convert_type(g, jnp.uint32) & (jnp.uint32(0) - m.astype(jnp.uint32)),
          jnp.float32)),
      "output select": jax.jit(lambda g, y, m: jnp.where(y > 0, g, 0.0)),
  }
  bits = {k: np.asarray(f(g, y, mask)).view(np.uint32) for k, f in fns.items()}
  for k in ("mask AND", "output select"):
    np.testing.assert_array_equal(bits[k], bits["mask select"])
  # g * 0.0 is -0.0 where g < 0: equal as numbers, not as bits
  np.testing.assert_array_equal(bits["mask multiply"].view(np.float32),
                                bits["mask select"].view(np.float32))
  times = {k: [] for k in fns}
  for _ in range(a.repeats):  # interleaved, so a change in the machine's speed hits all alike
    for k, f in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f(g, y, mask))
      times[k].append(time.perf_counter() - t)
  med = {k: statistics.median(v) for k, v in times.items()}
  print(f"jax {jax.__version__}, {platform.processor() or platform.machine()}, "
        f"{jax.devices()[0].platform}; float32 {'x'.join(map(str, shape))}, "
        f"median of {a.repeats}")
  print("   ".join(f"{k}: {v * 1e3:.2f} ms ({v / med['multiply']:.1f}x)" for k, v in med.items()))


if __name__ == "__main__":
  main()
