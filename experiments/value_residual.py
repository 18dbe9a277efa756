"""The value residual: modded-nanogpt's ablation chain, several seeds per row, t-tests vs baseline.

ResFormer (Zhou et al. 2024, arXiv 2410.17897) mixes every layer's attention values with the first
layer's, V_n <- 0.5 V_n + 0.5 V_1. The modded-nanogpt record of 2024-11-06 (GPT-2 small, FineWeb,
3200 steps) made the mix learnable and added an embedding shortcut x <- a x + b x0:

    baseline 3.3274 -> + fixed value residual 3.3151 -> + learnable lambda 3.3065
                    -> + embedding shortcut 3.2972       (validation loss, nats per GPT-2 token)

Each row adds one change to the row above, as the record's chain did. A fifth row swaps the
one-lambda mix for the two-lambda form y = lambda1 V_n + lambda2 V_1 (both learnable, init 0.5).
Every form is a Shortcut on the value stream (x = V_1, f = V_n): ``scaling`` 0.5/0.5, ``mix``
((1 - lambda) x + lambda f, init 0.5; the record's (1 - lambda) V_n + lambda V_1 is the same family
with lambda -> 1 - lambda) and ``lambda``. Learnable scalars train with Adam at their own LR and
no weight decay.

    python -m resjax.main --config experiments/value_residual.py:scale=cpu --workdir runs/vr_cpu
    python -m resjax.main --config experiments/value_residual.py:scale=paper --workdir gs://B/vr

Args: scale=paper|cpu|test, run=NAME, seeds=K.

scale=paper: GPT-2 small (12 layers, width 768, 12 heads, context 1024, tied head, Pre-LN) for
3200 steps of 512 x 1024 tokens, AdamW (LR 6e-4, betas 0.9/0.95, weight decay 0.1, clip 1.0,
200 warm-up steps, cosine decay), scalars at LR 0.02. Data: TFDS lm1b, read as UTF-8 bytes (a
256-byte vocabulary, so the model has 85M parameters rather than 124M): the largest English corpus
TFDS serves through data_source without a manual download; FineWeb is not in TFDS. Prepare it with
`python -m resjax.data.prepare --dataset lm1b`. Losses are nats per byte, not per GPT-2 token, so
the paper's numbers are a reference, not a target; the differences between rows are the
comparable fact. 5 rows x 3 seeds (side by side) is about 20 GPU-hours on one H100.

scale=cpu: 4 blocks of width 64 on the byte corpus of Python's own standard library (offline,
split by file), context 64, batch 16, 3 seeds side by side per row, 200 steps. Expect
differences of a few thousandths of a nat; the paired test over seeds says whether they are real.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from resjax import claims, configs
from resjax.configs import row

PAPER = "modded-nanogpt record 2024-11-06 (value residual of ResFormer, arXiv 2410.17897)"


def rows():
  vr, m = "model__value_residual__", "model__"
  fixed = {vr + "name": "scaling", vr + "scale": 0.5, vr + "branch_scale": 0.5}
  mix = {vr + "name": "mix"}
  return [
      row("baseline", "baseline (GPT-2, Pre-LN)", paper=3.3274),
      row("fixed_vr", "+ value residual, fixed 0.5 / 0.5", paper=3.3151, **fixed),
      row("learnable_vr", "+ learnable lambda per layer (init 0.5)", paper=3.3065, **mix),
      row("embed_shortcut", "+ embedding shortcut a x + b x0 (init 1, 0)", paper=3.2972,
          **mix, **{m + "embed_shortcut": True}),
      row("two_lambdas", "two learnable lambdas (init 0.5 / 0.5) + embedding shortcut",
          **{vr + "name": "lambda", m + "embed_shortcut": True}),
  ]


def paper_claims():
  """The record's chain: each change lowered the validation loss (one run each)."""
  chain = [("fixed_vr", "baseline", "the fixed value residual"),
           ("learnable_vr", "fixed_vr", "a learnable lambda"),
           ("embed_shortcut", "learnable_vr", "the embedding shortcut")]
  return [claims.claim(f"adding {what} lowers the loss", claims.less(new, old), paper=True)
          for new, old, what in chain]


def get_config(arg=None):
  arg = configs.parse_arg(arg, scale="cpu", run="", seeds=0)
  c = ml_collections.ConfigDict()
  c.experiment = "Value residual: modded-nanogpt's ablation chain"
  c.paper = PAPER
  c.scale = arg.scale
  c.run = arg.run
  c.seed = 0
  c.num_seeds = 3
  c.metric = "test_loss"
  c.report = "compare"
  c.baseline = "baseline"
  c.failure_error = None

  c.data = ml_collections.ConfigDict(dict(
      name="lm1b", data_dir=placeholder(str), max_train_bytes=2_000_000_000,
      max_test_bytes=20_000_000, max_eval_windows=2048))
  c.model = ml_collections.ConfigDict(dict(
      name="transformer", vocab_size=placeholder(int), context=1024, width=768, depth=12, heads=12,
      mlp_ratio=4, positions="learned", tie_head=True, norm="pre", parallel=False,
      shortcut=dict(name="identity"),
      value_residual=dict(name="none", scale=1.0, branch_scale=1.0),
      embed_shortcut=False, embed_shortcut_init=(1.0, 0.0), dropout=0.0, scan=True,
      dtype="float32"))
  c.batch_size = 512
  c.schedule = ml_collections.ConfigDict(dict(unit="iterations", total=3200, warmup=200,
                                              boundaries=()))
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=6e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
      decay="cosine", warmup_shape="linear", final_lr_fraction=0.1, scalar_lr=0.02))
  c.log_every = 50
  c.eval_every = 400
  c.checkpoint_every = 400
  c.eval_batch_size = 64

  if arg.scale in ("cpu", "test"):
    c.data.update(name="stdlib", max_train_bytes=placeholder(int), max_test_bytes=placeholder(int),
                  max_eval_windows=1024)
    c.model.update(context=64, width=64, depth=4, heads=4)
    c.num_seeds = 3
    c.batch_size = 16
    c.optim.update(lr=3e-3, scalar_lr=0.02, weight_decay=0.1)
    c.schedule.update(total=200, warmup=20)
    c.log_every, c.eval_every, c.checkpoint_every = 20, 40, 100
    c.eval_batch_size = 256
  if arg.scale == "test":
    c.data.max_eval_windows = 64
    c.model.update(context=16, width=16, depth=2, heads=2)
    c.num_seeds = 2
    c.batch_size = 8
    c.schedule.update(total=4, warmup=1)
    c.log_every, c.eval_every, c.checkpoint_every = 2, 4, 4
    c.eval_batch_size = 32
  if arg.seeds:
    c.num_seeds = arg.seeds
  c.runs = rows()
  c.claims = paper_claims()
  return c
