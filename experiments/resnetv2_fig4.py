"""ResNet-v2 Table 2 / Figure 4: where BN and ReLU sit in a residual unit, ResNet-110 and ResNet-164.

He, Zhang, Ren, Sun 2016, "Identity Mappings in Deep Residual Networks", arXiv 1603.05027.
(a) original: conv-BN-ReLU-conv-BN, add, ReLU; (b) BN after addition; (c) ReLU before addition;
(d) ReLU-only pre-activation; (e) full pre-activation (BN-ReLU-conv twice, add). ResNet-110 has 54
basic units, ResNet-164 54 bottleneck units (1x1, 3x3, 1x1 x4; widths 16/64/128/256 after the stem).
Pre-activation details: the first unit's activation comes right after the stem conv; a final
BN-ReLU comes before pooling; projection shortcuts take the pre-activated input.

    python -m resjax.main --config experiments/resnetv2_fig4.py:scale=cpu --workdir runs/fig4_cpu

Args: scale=paper|cpu|test, run=NAME, seeds=K, bottleneck=True|False (the ResNet-164 column;
on by default except at scale=cpu).

scale=paper: CIFAR-10 with ResNet-v2's recipe (resjax.configs.cifar_resnet_recipe), 5 seeds.
10 rows x 5 seeds; a ResNet-164 run takes a few GPU-hours.

scale=cpu: ResNet-56 (27 units) on the offline 8x8 digits with the shared recipe of
resjax.configs.digits_cpu (230 iterations, 3 seeds; bottleneck=True adds a 65-layer bottleneck
column). Error values are not the paper's; the claims are the comparable facts.

Paper (CIFAR-10 test error %): ResNet-110: 6.61, 8.17, 7.84, 6.71, 6.37;
ResNet-164: 5.93, 6.50, 6.14, 5.91, 5.46 for (a) to (e).
"""

from resjax import claims, configs
from resjax.configs import row

PLACEMENTS = (("post", "(a) original"), ("bn_after_add", "(b) BN after addition"),
              ("relu_before_add", "(c) ReLU before addition"),
              ("relu_preact", "(d) ReLU-only pre-activation"), ("preact", "(e) full pre-activation"))
PAPER = {110: (6.61, 8.17, 7.84, 6.71, 6.37), 164: (5.93, 6.50, 6.14, 5.91, 5.46)}


def rows(nets):
  out = []
  for depth, unit in nets:
    paper_depth = 110 if unit == "basic" else 164  # the paper's net of this unit kind
    shrunk = "" if depth == paper_depth else f" (paper: ResNet-{paper_depth})"
    for (placement, label), paper in zip(PLACEMENTS, PAPER[paper_depth]):
      # Option A for the basic-unit net (ResNet-v1 §4.2), projections (B) for the bottleneck net.
      out.append(row(f"{placement}_{depth}", f"{label}, ResNet-{depth}{shrunk}",
                     {"model.depth": depth, "model.unit": unit, "model.placement": placement,
                      "model.shortcut.option": "A" if unit == "basic" else "B"},
                     paper_error=paper))
  return out


def paper_claims(nets):
  """Table 2: full pre-activation has the lowest error and BN after addition the highest, at both
  depths (ResNet-v2 §4.1)."""
  out = []
  for depth, _ in nets:
    names = [f"{p}_{depth}" for p, _ in PLACEMENTS]
    best, worst = f"preact_{depth}", f"bn_after_add_{depth}"
    out += [
        claims.claim(f"(e) full pre-activation has the lowest error (ResNet-{depth})",
                     *[claims.less(best, n) for n in names if n != best], paper=True),
        claims.claim(f"(b) BN after addition has the highest error (ResNet-{depth})",
                     *[claims.less(n, worst) for n in names if n != worst], paper=True),
    ]
  return out


def get_config(arg=None):
  arg = configs.parse_arg(arg, scale="cpu", run="", seeds=0, bottleneck="auto")
  c = configs.cifar_resnet_recipe()
  c.experiment = "ResNet-v2 Table 2 / Figure 4: BN and ReLU placement, ResNet-110 and 164"
  c.paper = "He et al. 2016, Identity Mappings in Deep Residual Networks, arXiv 1603.05027"
  c.scale = arg.scale
  c.run = arg.run
  nets = ((110, "basic"), (164, "bottleneck"))
  if arg.bottleneck == "auto" and arg.scale == "cpu" or arg.bottleneck is False:
    nets = nets[:1]
  if arg.scale == "cpu":
    configs.digits_cpu(c)
    nets = ((56, "basic"),) + (((65, "bottleneck"),) if len(nets) > 1 else ())
  elif arg.scale == "test":
    configs.digits_test(c)
    nets = ((8, "basic"), (11, "bottleneck"))
  if arg.seeds:
    c.num_seeds = arg.seeds
  c.runs = rows(nets)
  c.claims = paper_claims(nets)
  c.baseline = "post_" + str(nets[0][0])
  return c
