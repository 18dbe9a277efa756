"""The caution's ResNet side: identity against a 1x1-conv shortcut on every unit, over depth.

ResNet-v1 (arXiv 1512.03385) Table 3: at 34 layers on ImageNet, projection shortcuts everywhere
(option C, 24.19% top-1 error) beat identity-with-projection-on-change (option B, 24.52%).
ResNet-v2 (arXiv 1603.05027) Table 1: at 110 layers on CIFAR-10, the 1x1-conv shortcut on every
unit gets 12.22% against identity's 6.61%. This file trains both on CIFAR ResNets from 20 to 218
layers, so the crossing can be seen on one axis: depth counted in residual additions (one per
unit), the axis experiments/caution_depth.py uses for Transformers.

    python -m resjax.main --config experiments/caution_depth_resnet.py:scale=cpu --workdir runs/caution_resnet_cpu

Args: scale=paper|cpu|test, run=NAME, seeds=K.

scale=paper: CIFAR-10, ResNet-v2's recipe (64k iterations at batch 128, LR 0.1 / 10 at 32k and
48k, 400 warm-up iterations at 0.01), depths 20, 56, 110, 218, 5 seeds; about 1-2 GPU-hours per
ResNet-110 run on a current GPU.

scale=cpu: the same nets on the offline 8x8 digits, 230 iterations, 1 seed (as
experiments/resnetv2_fig2.py at scale=cpu), depths 20, 56, 110.
Paper values: identity at 110 layers 6.61, 1x1 conv 12.22 (ResNet-v2 Table 1).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from resjax import configs
from resjax.configs import row

PAPER_110 = {"identity": 6.61, "conv1x1": 12.22}


def rows(depths):
  out = []
  for name, label in (("identity", "identity"), ("conv1x1", "1x1 conv shortcut")):
    for depth in depths:
      out.append(row(f"{name}_{depth}", f"{label}, ResNet-{depth}",
                     paper_error=PAPER_110[name] if depth == 110 else None, series=label,
                     x=(depth - 2) // 2, model__depth=depth, model__shortcut__name=name))
  return out


def get_config(arg=None):
  arg = configs.parse_arg(arg, scale="cpu", run="", seeds=0)
  c = ml_collections.ConfigDict()
  c.experiment = "Caution at depth, ResNets: identity vs 1x1-conv shortcut on every unit"
  c.paper = "He et al. 2016, arXiv 1512.03385 Table 3 and arXiv 1603.05027 Table 1"
  c.scale = arg.scale
  c.run = arg.run
  c.seed = 0
  c.num_seeds = 5
  c.failure_error = 20.0
  c.figure = "against_x"
  c.reference_series = "identity"
  c.x_label = "residual additions (units)"

  c.data = ml_collections.ConfigDict(dict(
      name="cifar10", data_dir=placeholder(str), pad=4, flip=True, train_size=placeholder(int),
      test_size=placeholder(int)))
  c.model = ml_collections.ConfigDict(dict(
      name="cifar_resnet", depth=110, unit="basic", placement="post", widths=(16, 32, 64),
      scan=True, conv_impl="auto", zero_init_residual=False,
      shortcut=dict(name="identity", option="B")))
  c.batch_size = 128
  c.schedule = ml_collections.ConfigDict(dict(
      unit="iterations", total=64_000, boundaries=(32_000, 48_000), warmup=400))
  c.optim = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.1, warmup_lr=0.01, decay="step", decay_factor=0.1, momentum=0.9,
      weight_decay=1e-4))
  c.log_every, c.eval_every, c.checkpoint_every = 100, 2000, 2000
  c.eval_batch_size = 500
  depths = (20, 56, 110, 218)

  if arg.scale in ("cpu", "test"):
    c.data.update(name="digits", pad=1, flip=False)
    c.num_seeds = 1
    c.batch_size = 64
    c.optim.update(lr=0.05, warmup_lr=0.005)
    c.schedule.update(total=230, boundaries=(160, 205), warmup=40)
    c.log_every, c.eval_every, c.checkpoint_every = 23, 115, 115
    depths = (20, 56, 110)
  if arg.scale == "test":
    c.batch_size = 32
    c.schedule.update(total=4, boundaries=(3,), warmup=1)
    c.log_every, c.eval_every, c.checkpoint_every = 2, 4, 4
    depths = (8, 14)
  if arg.seeds:
    c.num_seeds = arg.seeds
  c.runs = rows(depths)
  return c
