"""XLA:CPU's convolution inside ``lax.scan``: the same convolutions, unrolled and scanned.

A minimal reproduction for an upstream report, JAX alone (no resjax): K residual units of a 3x3
convolution (C channels, H x W, batch B, NHWC, float32), forward and backward, once as a Python
loop and once as ``lax.scan`` over the stacked kernels. Both compute the same function; the script
checks that, then prints the median time of each and their ratio.

    python tools/scan_conv_repro.py [--units 9] [--channels 16] [--size 32] [--batch 128]
"""

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def unit(x, w):
  return x + jax.nn.relu(conv(x, w))


def unrolled(ws, x):
  for i in range(ws.shape[0]):
    x = unit(x, ws[i])
  return jnp.sum(x * x)


def scanned(ws, x):
  x, _ = jax.lax.scan(lambda h, w: (unit(h, w), None), x, ws)
  return jnp.sum(x * x)


def timed(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile, and one warm run
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--units", type=int, default=9)
  p.add_argument("--channels", type=int, default=16)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args()
  kw, kx = jax.random.split(jax.random.key(0))
  ws = 0.1 * jax.random.normal(kw, (a.units, 3, 3, a.channels, a.channels), jnp.float32)
  x = jax.random.normal(kx, (a.batch, a.size, a.size, a.channels), jnp.float32)
  loop = jax.jit(jax.grad(unrolled))
  scan = jax.jit(jax.grad(scanned))
  # The same function: the kernels' gradients sum B H W products each, so float32 rounding is
  # bounded relative to their largest entry, not entry by entry.
  g_loop, g_scan = loop(ws, x), scan(ws, x)
  np.testing.assert_allclose(g_loop, g_scan, rtol=0, atol=1e-4 * float(jnp.abs(g_loop).max()))
  t_loop = timed(loop, (ws, x), a.repeats)
  t_scan = timed(scan, (ws, x), a.repeats)
  print(f"jax {jax.__version__}, {platform.processor() or platform.machine()}, "
        f"{jax.devices()[0].platform}; {a.units} units, 3x3 conv {a.channels} ch, "
        f"{a.size}x{a.size}, batch {a.batch}, forward + backward")
  print(f"unrolled: {t_loop * 1e3:.0f} ms   lax.scan: {t_scan * 1e3:.0f} ms   "
        f"scan / unrolled: {t_scan / t_loop:.1f}x")


if __name__ == "__main__":
  main()
