"""ResNet-v2 Table 1 / Figure 2: shortcut forms on CIFAR-10 with ResNet-110 (post-activation units).

He, Zhang, Ren, Sun 2016, "Identity Mappings in Deep Residual Networks", arXiv 1603.05027.

    python -m resjax.main --config experiments/resnetv2_fig2.py:scale=cpu --workdir runs/fig2_cpu
    python -m resjax.main --config experiments/resnetv2_fig2.py:scale=paper --workdir runs/fig2
    python -m resjax.main --config experiments/resnetv2_fig2.py:scale=paper,run=exclusive_gate_bg-6

Args: scale=paper|cpu|test, run=NAME (one row), seeds=K (seeds per row), gate_sweep (train the
"0 to -5" exclusive-gating row at every bias 0, -1, ..., -5 rather than at -5 alone).

scale=paper: the paper's recipe. CIFAR-10 (prepare it once with
`python -m resjax.data.prepare --dataset cifar10`), batch 128, 64k iterations, LR 0.1 divided by 10
at 32k and 48k, 400 warm-up iterations at LR 0.01, SGD momentum 0.9, L2 weight decay 1e-4, 4-pixel
pad + random crop + flip, per-pixel mean subtracted, 5 seeds with the median reported. A run
"fails" above 20% test error. 11 rows x 5 seeds of ResNet-110: in the paper one such run took
about 2-3 hours on a GPU of 2016; expect under an hour per run on one current GPU.

scale=cpu: the whole table on a 2-core CPU in under 20 minutes: still ResNet-110 (54 units), but
on scikit-learn's bundled 8x8 digits (offline), 1 seed and a few hundred iterations. The error
values are not the paper's; whether each row trains or fails is the comparable fact.

scale=test: ResNet-14 on digits for a few steps; for pytest.

The paper's rows (test error %, median of 5; "fail" = above 20%):
  (a) original 6.61; (b) constant scaling 0/1 fail (a plain net), 0.5/1 fail, 0.5/0.5 12.35;
  (c) exclusive gating b_g 0 to -5 fail, -6 8.70, -7 9.81; (d) shortcut-only gating b_g 0 12.86,
  -6 6.91; (e) 1x1 conv shortcut 12.22; (f) dropout shortcut 0.5 fail.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from resjax import configs
from resjax.configs import row


def rows(gate_sweep: bool = False):
  sc = "model__shortcut__"
  gate_rows = [row("exclusive_gate_bg-5", "(c) exclusive gating, b_g=-5 (paper: 0 to -5 fail)",
                   paper_failed=True, **{sc + "name": "exclusive_gate", sc + "gate_bias": -5.0})]
  if gate_sweep:
    gate_rows = [row(f"exclusive_gate_bg{-b}", f"(c) exclusive gating, b_g={-b}", paper_failed=True,
                     **{sc + "name": "exclusive_gate", sc + "gate_bias": float(-b)})
                 for b in range(0, 6)]
  return [
      row("identity", "(a) original", paper_error=6.61, **{sc + "name": "identity"}),
      row("scaling_0_1", "(b) constant scaling 0 / 1 (plain net)", paper_failed=True,
          **{sc + "name": "scaling", sc + "scale": 0.0, sc + "branch_scale": 1.0}),
      row("scaling_0.5_1", "(b) constant scaling 0.5 / 1", paper_failed=True,
          **{sc + "name": "scaling", sc + "scale": 0.5, sc + "branch_scale": 1.0}),
      row("scaling_0.5_0.5", "(b) constant scaling 0.5 / 0.5", paper_error=12.35,
          **{sc + "name": "scaling", sc + "scale": 0.5, sc + "branch_scale": 0.5}),
      *gate_rows,
      row("exclusive_gate_bg-6", "(c) exclusive gating, b_g=-6", paper_error=8.70,
          **{sc + "name": "exclusive_gate", sc + "gate_bias": -6.0}),
      row("exclusive_gate_bg-7", "(c) exclusive gating, b_g=-7", paper_error=9.81,
          **{sc + "name": "exclusive_gate", sc + "gate_bias": -7.0}),
      row("shortcut_gate_bg0", "(d) shortcut-only gating, b_g=0", paper_error=12.86,
          **{sc + "name": "shortcut_gate", sc + "gate_bias": 0.0}),
      row("shortcut_gate_bg-6", "(d) shortcut-only gating, b_g=-6", paper_error=6.91,
          **{sc + "name": "shortcut_gate", sc + "gate_bias": -6.0}),
      row("conv1x1", "(e) 1x1 conv shortcut", paper_error=12.22, **{sc + "name": "conv1x1"}),
      row("dropout_0.5", "(f) dropout shortcut 0.5", paper_failed=True,
          **{sc + "name": "dropout", sc + "dropout_rate": 0.5}),
  ]


def get_config(arg=None):
  arg = configs.parse_arg(arg, scale="cpu", run="", seeds=0, gate_sweep=False)
  c = ml_collections.ConfigDict()
  c.experiment = "ResNet-v2 Table 1 / Figure 2: shortcut forms, ResNet-110 on CIFAR-10"
  c.paper = "He et al. 2016, Identity Mappings in Deep Residual Networks, arXiv 1603.05027"
  c.scale = arg.scale
  c.run = arg.run
  c.seed = 0
  c.num_seeds = 5
  c.failure_error = 20.0  # the paper's "fail": test error above 20%

  c.data = ml_collections.ConfigDict(dict(
      name="cifar10", data_dir=placeholder(str), pad=4, flip=True, train_size=placeholder(int),
      test_size=placeholder(int)))
  c.model = ml_collections.ConfigDict(dict(
      name="cifar_resnet", depth=110, unit="basic", placement="post", widths=(16, 32, 64),
      scan=True, conv_impl="auto", zero_init_residual=False,
      shortcut=dict(name="identity", option="B", scale=1.0, branch_scale=1.0, gate_bias=0.0,
                    dropout_rate=0.5)))
  c.batch_size = 128
  c.schedule = ml_collections.ConfigDict(dict(
      unit="iterations", total=64_000, boundaries=(32_000, 48_000), warmup=400))
  c.optim = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.1, warmup_lr=0.01, decay="step", decay_factor=0.1, momentum=0.9,
      weight_decay=1e-4))
  c.log_every = 100
  c.eval_every = 2_000
  c.checkpoint_every = 2_000
  c.eval_batch_size = 500

  if arg.scale == "cpu":
    # Depth stays 110; data and steps shrink. Digits are 8x8 grey: pad 1 is CIFAR's 4/32, and
    # flips would turn digits into other shapes.
    c.data.update(name="digits", pad=1, flip=False)
    c.num_seeds = 1
    # Batch 64 with the LR scaled linearly (0.1 * 64 / 128); the warm-up at a tenth of it is the
    # paper's remedy for ResNet-110's slow start, here 40 steps.
    c.batch_size = 64
    c.optim.update(lr=0.05, warmup_lr=0.005)
    c.schedule.update(total=230, boundaries=(160, 205), warmup=40)
    c.log_every, c.eval_every, c.checkpoint_every = 23, 115, 115
  elif arg.scale == "test":
    c.data.update(name="digits", pad=1, flip=False)
    c.model.depth = 14
    c.num_seeds = 1
    c.batch_size = 32
    c.schedule.update(total=6, boundaries=(4,), warmup=2)
    c.log_every, c.eval_every, c.checkpoint_every = 2, 3, 3
  if arg.seeds:
    c.num_seeds = arg.seeds
  c.runs = rows(arg.gate_sweep)
  return c
