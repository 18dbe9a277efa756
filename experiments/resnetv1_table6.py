"""ResNet-v1 Table 6 and Figure 6: plain against residual CIFAR-10 nets from 20 to 1202 layers.

He, Zhang, Ren, Sun 2015, "Deep Residual Learning for Image Recognition", arXiv 1512.03385.
Option A shortcuts (identity, zero-padded channels, no parameters) everywhere; depth 6n+2 with
16/32/64 filters; plain nets are the same stacks without shortcuts. Figure 6: the plain nets'
training error rises with depth (the degradation problem), the residual nets' falls until 110.

    python -m resjax.main --config experiments/resnetv1_table6.py:scale=cpu --workdir runs/v1t6_cpu

Args: scale=paper|cpu|test, run=NAME, seeds=K.

scale=paper: CIFAR-10 (`python -m resjax.data.prepare --dataset cifar10`), 45k/5k train/val split
in the paper (here the full 50k train and the 10k test), batch 128, LR 0.1 divided by 10 at 32k and
48k iterations, stop at 64k (ResNet-110: 400 warm-up iterations at 0.01), L2 1e-4, momentum 0.9,
pad 4 + crop + flip. ResNet-1202 (19.4M parameters) needs one GPU with ~12 GB for ~1.5 days.

scale=cpu: ResNet and plain nets at 20, 56 and 110 layers on the offline 8x8 digits, 230
iterations each, 1 seed (5 minutes on 2 cores). ResNet-1202 runs only at scale=paper.

Paper (test error %): ResNet-20 8.75, -32 7.51, -44 7.17, -56 6.97, -110 6.43 (6.61 ± 0.16),
-1202 7.93. Plain nets: Figure 6 only; plain-110 above 60%, so here "fail" is above 60%.
"""

import ml_collections

from resjax import configs
from resjax.configs import row

PAPER = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}


def rows(depths):
  out = []
  for depth in depths:
    out.append(row(f"resnet{depth}", f"ResNet-{depth}", paper_error=PAPER.get(depth),
                   series="residual", x=depth, model__depth=depth))
  for depth in depths:
    if depth == 1202:
      continue  # the paper trained no plain-1202
    out.append(row(f"plain{depth}", f"plain-{depth}", paper_failed=depth == 110,
                   series="plain", x=depth, model__depth=depth, model__shortcut__name="none"))
  return out


def get_config(arg=None):
  arg = configs.parse_arg(arg, scale="cpu", run="", seeds=0)
  c = configs.cifar_resnet_recipe(shortcut=dict(name="identity", option="A"))
  c.experiment = "ResNet-v1 Table 6 / Figure 6: plain vs residual CIFAR-10 nets at depth"
  c.paper = "He et al. 2015, Deep Residual Learning for Image Recognition, arXiv 1512.03385"
  c.scale = arg.scale
  c.run = arg.run
  c.failure_error = 60.0
  depths = (20, 32, 44, 56, 110, 1202)
  if arg.scale == "cpu":
    configs.digits_cpu(c)
    depths = (20, 56, 110)
  elif arg.scale == "test":
    configs.digits_test(c)
    depths = (8, 14)
  if arg.seeds:
    c.num_seeds = arg.seeds
  c.runs = rows(depths)
  return c
