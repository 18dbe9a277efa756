"""The caution's ResNet side: identity against a 1x1-conv shortcut on every unit, over depth.

ResNet-v1 (arXiv 1512.03385) Table 3: at 34 layers on ImageNet, projection shortcuts everywhere
(option C, 24.19% top-1 error) beat identity-with-projection-on-change (option B, 24.52%).
ResNet-v2 (arXiv 1603.05027) Table 1: at 110 layers on CIFAR-10, the 1x1-conv shortcut on every
unit gets 12.22% against identity's 6.61%. This file trains both on CIFAR ResNets from 20 to 1202
layers, so the crossing can be seen on one axis: depth counted in residual additions (one per
unit), the axis experiments/caution_depth.py uses for Transformers.

    python -m resjax.main --config experiments/caution_depth_resnet.py:scale=cpu --workdir runs/caution_resnet_cpu

Args: scale=paper|cpu|test, run=NAME, seeds=K.

scale=paper: CIFAR-10, ResNet-v2's recipe (64k iterations at batch 128, LR 0.1 / 10 at 32k and
48k, 400 warm-up iterations at 0.01), depths 20, 56, 110, 218, 1202, 5 seeds; about 1-2
GPU-hours per ResNet-110 run on a current GPU, ten times that for ResNet-1202.

scale=cpu: the same nets on the offline 8x8 digits with the shared recipe of
resjax.configs.digits_cpu (230 iterations, 3 seeds side by side), depths 20, 56, 110.
Paper values: identity at 110 layers 6.61, 1x1 conv 12.22 (ResNet-v2 Table 1). The recipe is
resjax.configs.caution_resnet, the one ``python -m resjax.caution`` trains any form on.
"""

from resjax import claims, configs
from resjax.configs import row

PAPER_110 = {"identity": 6.61, "conv1x1": 12.22}


def rows(depths):
  out = []
  for name, label in (("identity", "identity"), ("conv1x1", "1x1 conv shortcut")):
    for depth in depths:
      out.append(row(f"{name}_{depth}", f"{label}, ResNet-{depth}",
                     {"model.depth": depth, "model.shortcut.name": name},
                     paper_error=PAPER_110[name] if depth == 110 else None, series=label,
                     x=(depth - 2) // 2))
  return out


def paper_claims(depths):
  lo, hi = min(depths), max(depths)
  return [
      claims.claim(f"the 1x1 conv shortcut is worse than identity at {hi} layers "
                   "(ResNet-v2 Table 1, at 110)", claims.less(f"identity_{hi}", f"conv1x1_{hi}"),
                   paper=True),
      claims.claim(f"the 1x1 conv shortcut is ahead of identity at {lo} layers (ResNet-v1 Table "
                   "3 found option C ahead at 34 layers, on ImageNet)",
                   claims.less(f"conv1x1_{lo}", f"identity_{lo}"), paper=True),
  ]


def get_config(arg=None):
  arg = configs.parse_arg(arg, scale="cpu", run="", seeds=0)
  c, depths = configs.caution_resnet(arg.scale)  # the recipe python -m resjax.caution trains on
  c.experiment = "Caution at depth, ResNets: identity vs 1x1-conv shortcut on every unit"
  c.paper = "He et al. 2016, arXiv 1512.03385 Table 3 and arXiv 1603.05027 Table 1"
  c.run = arg.run
  c.figure = "against_x"
  c.reference_series = "identity"
  c.x_label = "residual additions (units)"
  if arg.seeds:
    c.num_seeds = arg.seeds
  c.runs = rows(depths)
  c.claims = paper_claims(depths)
  c.baseline = f"identity_{min(depths)}"
  return c
