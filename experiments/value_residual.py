"""The value-residual chain on the record's own model: modded-nanogpt's record of 2024-11-06.

The record (records/track_1_short/2024-11-06_ShortcutsTweaks in KellerJordan/modded-nanogpt, its
train_gpt2.py logs) added, one at a time, to the model of the 11/03 record trained 3200 steps:

    baseline 3.3274 -> + value residual, fixed 0.5 / 0.5 3.3151 -> + learnable lambda 3.3065
                    -> + embedding shortcut 3.2972   (validation loss, nats per GPT-2 token, 1 run)

Every choice below is the record's, read from its train_gpt2.py (resjax.configs.RECORD_MODEL,
record_recipe, MUON):
- model: 12 blocks, width 768, 6 heads of 128, MLP 4 x 768 with ReLU^2, rotary positions,
  RMSNorm without a gain (eps: float32's, F.rms_norm's default) before each branch, on the token
  embedding and before the head, QK-norm, no biases, nn.Linear / nn.Embedding default init,
  zero-initialised attention-out, MLP-out and head, untied head, vocabulary 50304;
- the value residual: v <- (1 - lambda) v + lambda v1 in every block, lambda learnable from 0.5
  (resjax's ``mix`` with V_1 as the carried input: the same family, lambda -> 1 - lambda);
- the embedding shortcut: x <- a x + b x0 at the input of every block, x0 the normed embedding,
  (a, b) learnable from (1, 0);
- optimizer: Muon (LR 0.02, momentum 0.95, Nesterov, 5 Newton-Schulz steps) on the blocks'
  matrices; Adam (betas 0.9 / 0.95) on the embedding (LR 0.3), the head (0.002) and the scalars
  (0.02); no weight decay; no warm-up, constant, linear warm-down to 0 over the last 914 of 3200
  steps, every group (scalars included);
- data: FineWeb GPT-2 tokens (``data.name=fineweb``, README "Data"), 3200 steps of 8 x 64
  sequences of 1024 tokens, validation on the first 10,485,760 val tokens.
Departures: the record orthogonalises in bfloat16 (here float32); the record's step is bfloat16
autocast (here bfloat16 matmuls, float32 norms and logits, ``dtype=bfloat16``). The baseline row
is the 11/06 model without the three changes: the record's README lists its steps (shorter run,
value residual, learnable lambda, embedding shortcut, then momentum warm-up and tanh logit capping,
which this file leaves out), so everything else was the 11/03 model's; the 11/03 file itself was
not read.

    python -m resjax.main --config experiments/value_residual.py:scale=cpu --workdir runs/vr_cpu
    python -m resjax.main --config experiments/value_residual.py:scale=paper \
        --config.data.data_dir=/path/to/modded-nanogpt/data/fineweb10B --workdir runs/vr

Args: scale=paper|cpu|test, run=NAME, seeds=K.

scale=paper: the record's recipe on one host with 8 GPUs (the batch is split over all local
devices); 4 rows x 3 seeds, one seed at a time, about 8.5 minutes each on 8 H100s at the record's
152 ms per step (its log), so about 2 GPU-hours on 8 GPUs in all. ``--mode=describe`` gives the
parameters (162,201,636), FLOPs per token and per step, and the MFU the record's logged step time
implies on 8 H100s.

scale=cpu: the same model at width 64 (2 heads of 32), 4 blocks, context 64, batch 16, 200 steps
(warm-down over the last 57) on the byte corpus of Python's standard library, 3 paired seeds side
by side. The learning rates are the record's times CPU_LR_FACTOR = 2, every group alike, tuned on
the baseline row alone (seeds 100-102, apart from the seeds 0-2 the table reports) and then kept
for every row. Final test loss per factor, seeds 100 / 101 / 102:

    0.25: 2.684 / 2.695 / 2.699    0.5: 2.226 / 2.218 / 2.221    1: 1.948 / 1.935 / 1.946
    2:    1.852 / 1.852 / 1.863  <- chosen: lowest median
    4:    1.856 / 1.867 / 1.865    8: 1.903 / 1.927 / 1.923

The same tricks on GPT-2 with AdamW are the second series, experiments/value_residual_gpt2.py.
"""

from resjax import claims, configs
from resjax.configs import row

PAPER = "modded-nanogpt record 2024-11-06 (value residual of ResFormer, arXiv 2410.17897)"
# The record's logged step: 151.96 ms a step on 8 x H100 SXM (05b29e54...txt, step 3200), and the
# H100 SXM's dense bfloat16 peak, 989 TFLOP/s (NVIDIA's data sheet), for describe's MFU.
RECORD_STEP = dict(seconds=0.15196, devices=8, peak_flops=989e12, device="H100 SXM")
CPU_LR_FACTOR = 2.0  # tuned on the baseline row at scale=cpu (module docstring)


def rows():
  none = {"model.value_residual.name": "none", "model.value_residual_first": False,
          "model.embed_shortcut": False, "model.embed_shortcut_first": False}
  fixed = {**none, "model.value_residual.name": "scaling", "model.value_residual.scale": 0.5,
           "model.value_residual.branch_scale": 0.5}
  mix = {**none, "model.value_residual.name": "mix", "model.value_residual_first": True}
  return [
      row("baseline", "baseline (the record's model without the three)", none, paper=3.3274),
      row("fixed_vr", "+ value residual, fixed 0.5 / 0.5", fixed, paper=3.3151),
      row("learnable_vr", "+ learnable lambda per block (init 0.5)", mix, paper=3.3065),
      row("embed_shortcut", "+ embedding shortcut a x + b x0 at every block (init 1, 0)",
          {**mix, "model.embed_shortcut": True, "model.embed_shortcut_first": True},
          paper=3.2972),
  ]


def get_config(arg=None):
  arg = configs.parse_arg(arg, scale="cpu", run="", seeds=0)
  c = configs.record_recipe()
  c.experiment = "Value residual: modded-nanogpt's chain on the record's model and optimizer"
  c.paper = PAPER
  c.scale = arg.scale
  c.run = arg.run
  c.baseline = "baseline"
  c.reference_step = RECORD_STEP
  if arg.scale in ("cpu", "test"):
    configs.lm_cpu(c)
    c.model.update(context=64, width=64, depth=4, heads=2, dtype="float32")
    c.batch_size = 16
    c.schedule.total = 200
    configs.muon_optim(c)  # the record's optimizer and its share of warm-down, on the new length
    for key in ("lr", "embed_lr", "head_lr", "scalar_lr"):
      c.optim[key] *= CPU_LR_FACTOR
    c.seeds_side_by_side = True
    c.log_every, c.eval_every, c.checkpoint_every = 20, 40, 100
  if arg.scale == "test":
    configs.lm_test(c)
    c.model.update(context=16, width=16, depth=2, heads=2)
    c.schedule.total = 4
    configs.muon_optim(c)
  if arg.seeds:
    c.num_seeds = arg.seeds
  c.runs = rows()
  c.claims = claims.chain(configs.RECORD_CHAIN)  # each step lowered the record's loss
  return c
