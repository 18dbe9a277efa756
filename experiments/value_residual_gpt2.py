"""The value-residual chain's tricks transplanted to GPT-2 with AdamW: the second series.

The modded-nanogpt record of 2024-11-06 trained its chain on its own model and optimizer
(experiments/value_residual.py). This file applies the same tricks, in the same order, to a 2019
GPT-2 (LayerNorm, GELU, learned positions, tied head, AdamW with warm-up and cosine decay) on
byte-level text: it says what the tricks do on another model, not whether the record's chain
reproduces. ResFormer (Zhou et al. 2024, arXiv 2410.17897) mixes every layer's attention values
with the first layer's, V_n <- 0.5 V_n + 0.5 V_1; the record made the mix learnable and added an
embedding shortcut x <- a x + b x0. The record's numbers (its model, FineWeb, nats per GPT-2
token) stay beside the rows as a reference:

    baseline 3.3274 -> + fixed value residual 3.3151 -> + learnable lambda 3.3065
                    -> + embedding shortcut 3.2972

Each row adds one change to the row above, as the record's chain did. A fifth row swaps the
one-lambda mix for the two-lambda form y = lambda1 V_n + lambda2 V_1 (both learnable, init 0.5).
Every form is a Shortcut on the value stream (x = V_1, f = V_n): ``scaling`` 0.5/0.5, ``mix``
((1 - lambda) x + lambda f, init 0.5; the record's (1 - lambda) V_n + lambda V_1 is the same family
with lambda -> 1 - lambda) and ``lambda``. Learnable scalars train with Adam at their own LR and
no weight decay.

    python -m resjax.main --config experiments/value_residual_gpt2.py:scale=cpu --workdir runs/vr_gpt2_cpu
    python -m resjax.main --config experiments/value_residual_gpt2.py:scale=paper --workdir gs://B/vr_gpt2

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

from resjax import claims, configs
from resjax.configs import row

PAPER = "modded-nanogpt record 2024-11-06 (value residual of ResFormer, arXiv 2410.17897)"


def rows():
  fixed = {"model.value_residual.name": "scaling", "model.value_residual.scale": 0.5,
           "model.value_residual.branch_scale": 0.5}
  mix = {"model.value_residual.name": "mix"}
  return [
      row("baseline", "baseline (GPT-2, Pre-LN, AdamW)", paper=3.3274),
      row("fixed_vr", "+ value residual, fixed 0.5 / 0.5", fixed, paper=3.3151),
      row("learnable_vr", "+ learnable lambda per layer (init 0.5)", mix, paper=3.3065),
      row("embed_shortcut", "+ embedding shortcut a x + b x0 (init 1, 0)",
          {**mix, "model.embed_shortcut": True}, paper=3.2972),
      row("two_lambdas", "two learnable lambdas (init 0.5 / 0.5) + embedding shortcut",
          {"model.value_residual.name": "lambda", "model.embed_shortcut": True}),
  ]


def get_config(arg=None):
  arg = configs.parse_arg(arg, scale="cpu", run="", seeds=0)
  c = configs.lm_recipe()
  c.experiment = "Value residual: the record's chain transplanted to GPT-2 with AdamW"
  c.paper = PAPER
  c.scale = arg.scale
  c.run = arg.run
  c.baseline = "baseline"
  if arg.scale in ("cpu", "test"):
    configs.lm_cpu(c)
    c.model.update(context=64, width=64, depth=4, heads=4)
    c.batch_size = 16
    c.schedule.update(total=200, warmup=20)
    c.log_every, c.eval_every, c.checkpoint_every = 20, 40, 100
  if arg.scale == "test":
    configs.lm_test(c)
    c.model.update(context=16, width=16, depth=2, heads=2)
    c.schedule.update(total=4, warmup=1)
  if arg.seeds:
    c.num_seeds = arg.seeds
  c.runs = rows()
  c.claims = claims.chain(configs.RECORD_CHAIN)  # each step lowered the record's loss
  return c
