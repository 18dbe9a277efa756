"""ResNet-v1 Tables 2 and 3: plain against residual nets on ImageNet, and shortcut options A/B/C.

He, Zhang, Ren, Sun 2015, "Deep Residual Learning for Image Recognition", arXiv 1512.03385.
Table 2 (top-1 error, option A): plain-18 27.94, ResNet-18 27.88, plain-34 28.54, ResNet-34 25.03:
the deeper plain net is worse (degradation), the deeper residual net better. Table 3 (10-crop):
ResNet-34 with A (zero-padding) 25.03, B (projection where the shape changes) 24.52, C (projection
everywhere) 24.19. The paper evaluated 10 crops; resjax evaluates one centre 224 crop, which reads
about 1-2 points higher.

    python -m resjax.main --config experiments/resnetv1_table3.py:scale=paper --workdir gs://B/v1t3
    python -m resjax.main --config experiments/resnetv1_table3.py:scale=cpu --workdir runs/v1t3_cpu

Args: scale=paper|cpu|test, run=NAME, seeds=K.

scale=paper: ImageNet 2012 (a manual download: place ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in a folder and run `python -m resjax.data.prepare --dataset imagenet2012
--manual_dir DIR`), scale augmentation (short side in [256, 480], random 224 crop, flip, lighting),
batch 256, SGD momentum 0.9, L2 1e-4, LR 0.1 divided by 10 at epochs 30 and 60 of 90 (the paper
divided on plateaus, up to 600k iterations, which is about this), 1 seed. A ResNet-34 run is about
a day on 8 current GPUs or a TPU v4-32 slice; 6 rows.

scale=cpu: the same architectures at 1/8 width (stem 8, stages 8/16/32/64) on the offline 8x8
digits, 230 iterations, 3 seeds: ImageNet itself cannot be downloaded on the fly, and these runs
only check that the pipeline and the degradation comparison work end to end (3 minutes on 2
cores). On 8x8 inputs the stem and max pool leave 1x1 maps from stage 2 on, so the errors say
nothing about the paper's tables.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from resjax import claims, configs
from resjax.configs import row


def rows():
  plain = lambda depth: {"model.depth": depth, "model.shortcut.name": "none"}
  option = lambda depth, o: {"model.depth": depth, "model.shortcut.option": o}
  return [
      row("plain18", "plain-18 (Table 2)", plain(18), paper=27.94),
      row("resnet18_A", "ResNet-18, A (Table 2)", option(18, "A"), paper=27.88),
      row("plain34", "plain-34 (Tables 2, 3)", plain(34), paper=28.54),
      row("resnet34_A", "ResNet-34, A", option(34, "A"), paper=25.03),
      row("resnet34_B", "ResNet-34, B", option(34, "B"), paper=24.52),
      row("resnet34_C", "ResNet-34, C", option(34, "C"), paper=24.19),
  ]


def paper_claims():
  """Tables 2-3: the degradation problem at 18 -> 34 layers, and C < B < A < plain at 34."""
  return [
      claims.claim("plain-34 is worse than plain-18 (degradation)", claims.less("plain18", "plain34"),
                   paper=True),
      claims.claim("ResNet-34 A beats ResNet-18 A", claims.less("resnet34_A", "resnet18_A"),
                   paper=True),
      claims.claim("at 34 layers, C < B < A < plain in error",
                   claims.less("resnet34_C", "resnet34_B"), claims.less("resnet34_B", "resnet34_A"),
                   claims.less("resnet34_A", "plain34"), paper=True),
  ]


def get_config(arg=None):
  arg = configs.parse_arg(arg, scale="cpu", run="", seeds=0)
  c = ml_collections.ConfigDict()
  c.experiment = "ResNet-v1 Tables 2 and 3: plain vs residual ImageNet nets, shortcut options A/B/C"
  c.paper = "He et al. 2015, Deep Residual Learning for Image Recognition, arXiv 1512.03385"
  c.scale = arg.scale
  c.run = arg.run
  c.seed = 0
  c.num_seeds = 1
  c.metric = "test_error"
  c.report = "compare"
  c.baseline = "resnet34_A"
  c.failure_error = None
  c.data = ml_collections.ConfigDict(dict(
      name="imagenet2012", data_dir=placeholder(str), image_size=224, lighting_std=0.1,
      num_workers=placeholder(int), pad=0, flip=False))
  c.model = ml_collections.ConfigDict(dict(
      name="imagenet_resnet", depth=34, placement="post", widths=(64, 128, 256, 512),
      stem_width=64, scan=True, remat="none", conv_impl="auto", zero_init_residual=False,
      shortcut=dict(name="identity", option="A")))
  c.batch_size = 256
  c.schedule = ml_collections.ConfigDict(dict(unit="epochs", total=90, boundaries=(30, 60),
                                              warmup=0))
  c.optim = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.1, decay="step", decay_factor=0.1, momentum=0.9, weight_decay=1e-4))
  c.log_every, c.eval_every, c.checkpoint_every = 500, 5_000, 5_000
  c.eval_batch_size = 250
  if arg.scale in ("cpu", "test"):
    c.data = ml_collections.ConfigDict(dict(name="digits", data_dir=placeholder(str), pad=1,
                                            flip=False, train_size=placeholder(int),
                                            test_size=placeholder(int)))
    c.model.update(widths=(8, 16, 32, 64), stem_width=8)
    c.batch_size = 64
    c.optim.update(lr=0.05)
    c.schedule.update(unit="iterations", total=230, boundaries=(161, 204), warmup=0)
    c.num_seeds = 3
    c.log_every, c.eval_every, c.checkpoint_every = 10, 23, 115
  if arg.scale == "test":
    c.num_seeds = 1
    c.batch_size = 16
    c.schedule.update(total=3, boundaries=(2,))
    c.log_every, c.eval_every, c.checkpoint_every = 3, 3, 3
  if arg.seeds:
    c.num_seeds = arg.seeds
  c.runs = rows()
  c.claims = paper_claims()
  return c
