"""Post-LN against Pre-LN, each with and without learning-rate warm-up, at two depths.

Xiong et al. 2020 (arXiv 2002.04745): the Post-LN Transformer (LayerNorm after each residual
addition, the original design) needs a learning-rate warm-up, because at initialisation the
gradients of its last layers are large; Pre-LN (LayerNorm at each sub-block's input, plus a final
LayerNorm) trains without one. The paper gives curves, not a table, so rows carry no paper number;
its claims are stated as predicates over the rows (``paper_claims``).

Rows change one thing at a time. Post-LN and Pre-LN rows share the initialisation (every weight
N(0, 0.02)), so they differ only in where the norm sits. The GPT-2 rows are Pre-LN with GPT-2's
1/sqrt(2L) scaling of the residual output projections as well: two changes from Post-LN, labelled
as such.

    python -m resjax.main --config experiments/preln_postln.py:scale=cpu --workdir runs/ln_cpu

Args: scale=paper|cpu|test, run=NAME, seeds=K.

scale=paper: 6 and 24 blocks of width 512 (8 heads), context 512, byte-level lm1b, AdamW at LR
1e-3 (high enough for warm-up to matter), 20k steps, 4k warm-up steps where warm-up is on; 3 seeds.
About 4 GPU-days on one H100 for all 12 rows.

scale=cpu: 2 and 6 blocks of width 64 on the Python standard-library byte corpus, context 64,
batch 16, AdamW at LR 3e-3, 150 steps (30 warm-up), 3 seeds side by side.
"""

from resjax import claims, configs
from resjax.configs import row


NORMS = (  # (row prefix, label, model overrides)
    ("post", "Post-LN", {"model.norm": "post", "model.scaled_out_init": False}),
    ("pre", "Pre-LN", {"model.norm": "pre", "model.scaled_out_init": False}),
    ("gpt2", "GPT-2 Pre-LN (1/sqrt(2L) init)", {"model.norm": "pre", "model.scaled_out_init": True}),
)


def rows(depths):
  out = []
  for depth in depths:
    for prefix, norm_label, overrides in NORMS:
      for warm in (True, False):
        label = f"{norm_label}, {'with' if warm else 'no'} warm-up, {depth} blocks"
        series = f"{norm_label} {'+ warm-up' if warm else 'no warm-up'}"
        out.append(row(f"{prefix}_{'warm' if warm else 'nowarm'}_d{depth}", label,
                       {**overrides, "model.depth": depth,
                        **({} if warm else {"schedule.warmup": 0})},
                       series=series, x=2 * depth))
  return out


def paper_claims(depths):
  out = []
  for d in depths:
    out += [
        claims.claim(f"Post-LN needs warm-up: it ends lower with it ({d} blocks)",
                     claims.less(f"post_warm_d{d}", f"post_nowarm_d{d}"), paper=True),
        claims.claim(f"Without warm-up, Pre-LN ends lower than Post-LN ({d} blocks)",
                     claims.less(f"pre_nowarm_d{d}", f"post_nowarm_d{d}"), paper=True),
    ]
  return out


def get_config(arg=None):
  arg = configs.parse_arg(arg, scale="cpu", run="", seeds=0)
  c = configs.lm_recipe(context=512, width=512, depth=6, heads=8)
  c.experiment = "Post-LN vs Pre-LN, with and without warm-up, at two depths"
  c.paper = "Xiong et al. 2020, On Layer Normalization in the Transformer Architecture, arXiv 2002.04745"
  c.scale = arg.scale
  c.run = arg.run
  c.figure = "against_x"
  c.reference_series = "Post-LN + warm-up"
  c.x_label = "residual additions (2 per block)"
  c.batch_size = 64
  c.schedule.update(total=20_000, warmup=4_000)
  c.optim.update(lr=1e-3, b2=0.98, weight_decay=0.01, clip_norm=0.0, decay="linear",
                 final_lr_fraction=0.0, scalar_lr=0.0)
  c.log_every, c.eval_every, c.checkpoint_every = 100, 2000, 2000
  depths = (6, 24)
  if arg.scale in ("cpu", "test"):
    configs.lm_cpu(c)
    c.model.update(context=64, width=64, depth=2, heads=4)
    c.batch_size = 16
    c.schedule.update(total=150, warmup=30)
    c.log_every, c.eval_every, c.checkpoint_every = 25, 75, 75
    depths = (2, 6)
  if arg.scale == "test":
    configs.lm_test(c)
    c.model.update(context=16, width=16, heads=2)
    c.schedule.update(total=4, warmup=2)
    depths = (1, 2)
  if arg.seeds:
    c.num_seeds = arg.seeds
  c.runs = rows(depths)
  c.claims = paper_claims(depths)
  return c
