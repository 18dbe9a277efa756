"""The caution, as one figure: does a residual trick that helps shallow nets still help deep ones?

ResNet-v1's option C (a 1x1 projection on every shortcut) beat identity at 34 layers; ResNet-v2
showed the same 1x1 shortcut failing to match identity at 110 (12.22% vs 6.61%), and constant
scaling of the shortcut (0.5 x + F(x)) failing outright: stacked, any non-identity shortcut
multiplies the signal path by its gain once per unit (Eq. 8). The learnable residual
y = lambda1 F(x) + lambda2 x with lambdas initialised to 0.5 is exactly that constant scaling at
initialisation, so stacked on every residual of a deep stream it halves the shortcut path per
addition. This experiment trains a Pre-LN Transformer LM over depths with four residual variants:

* identity: x + F(x) on every residual (the reference);
* value residual: identity, plus V_n <- lambda1 V_n + lambda2 V_1 in every attention (init 0.5);
* stacked lambda: lambda1 F(x) + lambda2 x on every residual of the stream (init 0.5 / 0.5);
* dense shortcut: W x + F(x), a learned projection on every residual (option C for tokens).

Depth is counted in residual additions (2 per block) so it shares an axis with the ResNets of
experiments/caution_depth_resnet.py (1 per unit). results.md gives the final test loss against
depth per variant and the depth at which each variant's advantage over identity changes sign.

    python -m resjax.main --config experiments/caution_depth.py:scale=cpu --workdir runs/caution_cpu

Args: scale=paper|cpu|test, run=NAME, seeds=K, variants=all or names joined by "+"
(e.g. variants=identity+stacked_lambda). The recipe is resjax.configs.caution_lm, the one
``python -m resjax.caution`` trains any form on.

scale=paper: width 512 (8 heads), context 256, depths 2 to 256 blocks (4 to 512 additions) on
byte-level lm1b, 10k steps of AdamW; 3 seeds. The 256-block rows need ~10 GPU-hours each on an H100.

scale=cpu: width 32 (2 heads), context 32, 1, 4 and 16 blocks (2, 8, 32 additions) on the Python
standard-library byte corpus, 200 steps, 3 seeds side by side.
"""

from resjax import claims, configs
from resjax.configs import row

REFERENCE = "identity"


def variants():
  return {
      "identity": {},
      "value residual": {"model.value_residual.name": "lambda"},
      "stacked lambda": {"model.shortcut.name": "lambda"},
      "dense shortcut": {"model.shortcut.name": "conv1x1"},
  }


def rows(depths, names):
  out = []
  for name, overrides in variants().items():
    if names and name.replace(" ", "_") not in names:
      continue
    for depth in depths:
      blocks = f"{depth} block" + "s" * (depth != 1)
      out.append(row(f"{name.replace(' ', '_')}_d{depth}", f"{name}, {blocks}",
                     {"model.depth": depth, **overrides}, series=name, x=2 * depth))
  return out


def paper_claims(depths, names):
  """The caution: a form ahead of identity at the shallowest depth is behind it at the deepest.

  No paper measured this on a Transformer; "paper" here is the verdict the caution predicts from
  ResNet-v2 Table 1 and Eq. 8 (a non-identity shortcut's gain compounds once per addition).
  """
  lo, hi = min(depths), max(depths)
  out = []
  for name in ("stacked lambda", "dense shortcut"):
    key = name.replace(" ", "_")
    if names and key not in names:
      continue
    out.append(claims.claim(
        f"{name}: ahead of identity at {lo} block(s), behind it at {hi}",
        claims.less(f"{key}_d{lo}", f"identity_d{lo}"), claims.less(f"identity_d{hi}", f"{key}_d{hi}"),
        paper=True))
  return out


def get_config(arg=None):
  arg = configs.parse_arg(arg, scale="cpu", run="", seeds=0, variants="all")
  # Shortcuts keep their default option B, which projects only where the shape changes, which on
  # tokens is never: the identity, value-residual and lambda rows carry x as it is; the dense
  # row's conv1x1 is option C itself.
  c, depths = configs.caution_lm(arg.scale)  # the recipe python -m resjax.caution trains on
  c.experiment = "Caution at depth: residual variants against identity, Transformer LM"
  c.paper = ("He et al. 2016 (arXiv 1603.05027) Table 1 / Eq. 8, carried to learnable residual "
             "scalars and the value residual")
  c.run = arg.run
  c.figure = "against_x"
  c.reference_series = REFERENCE
  c.x_label = "residual additions"
  if arg.seeds:
    c.num_seeds = arg.seeds
  names = [] if arg.variants == "all" else str(arg.variants).split("+")
  c.runs = rows(depths, names)
  if not names or "identity" in names:
    c.claims = paper_claims(depths, names)
  return c
