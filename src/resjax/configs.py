"""Helpers shared by the experiment files: the arg string, run rows, overrides, durations.

An experiment file's ``get_config(arg)`` receives the text after the colon of
``--config experiments/FILE.py:scale=cpu,run=identity`` and parses it with ``parse_arg``.
"""

from __future__ import annotations

import copy
import math
import ml_collections
from ml_collections.config_dict import placeholder

from resjax.errors import ConfigError

SCALES = ("paper", "cpu", "test")
# Shortcut configs: a row may set any key of the form it names (shortcuts.fields), declared or not
# in the experiment's base config; every other key must be one the base config declares. The forms
# are imported only then: resjax.models.shortcuts brings JAX and flax, which an experiment file
# does not otherwise need (importing this module takes 0.07 s without them, 1.7 s with them).
SHORTCUT_CONFIGS = ("model.shortcut", "model.value_residual")


def _typed(text: str):
  low = text.lower()
  if low in ("true", "false"):
    return low == "true"
  if low == "none":
    return None
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"scale=cpu,run=identity,seeds=3"`` into a ConfigDict, typed after ``defaults``.

  Keys not in ``defaults`` are an error, so a typo cannot silently run the wrong experiment.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(f"unknown config arg {key!r}: the args of this file are "
                        f"{', '.join(sorted(defaults))} (e.g. :scale=cpu)")
    out[key] = _typed(value.strip()) if sep else True
    default = defaults[key]
    if isinstance(default, bool) and not isinstance(out[key], bool):
      raise ConfigError(f"config arg {key}={out[key]!r} is not True or False: write {key}=True, "
                        f"{key}=False, or {key} alone for True")
    if (isinstance(default, int) and not isinstance(default, bool)
        and (isinstance(out[key], bool) or not isinstance(out[key], int))):
      raise ConfigError(f"config arg {key}={out[key]!r} is not a whole number: write e.g. {key}=3")
  if "scale" in out and out["scale"] not in SCALES:
    raise ConfigError(f"unknown scale {out['scale']!r}: use one of {', '.join(SCALES)}")
  return ml_collections.ConfigDict(out)


def row(name: str, label: str, overrides: dict | None = None, *,
        paper_error: float | None = None, paper_failed: bool = False, paper: float | None = None,
        series: str | None = None, x: float | None = None, **keyword_overrides
        ) -> ml_collections.ConfigDict:
  """One row of a paper table: a run name, its label, the paper's number and its config overrides.

  ``paper_error`` / ``paper_failed``: the paper's test error % (or "fail") for error tables;
  ``paper``: the paper's value of the experiment's metric otherwise (e.g. a validation loss).
  ``series`` and ``x``: for figures of a metric against a swept quantity (a line per series).
  Overrides are a dict of dotted keys (``{"model.shortcut.name": "scaling"}``), or keywords with
  "__" for "." (``model__depth=56``).
  """
  overrides = {**(overrides or {}), **keyword_overrides}
  return ml_collections.ConfigDict({
      "name": name, "label": label, "paper_error": paper_error, "paper_failed": paper_failed,
      "paper": paper if paper is not None else paper_error, "series": series, "x": x,
      # (dotted key, value) pairs: ConfigDict keys cannot hold dots.
      "overrides": tuple((k.replace("__", "."), v) for k, v in overrides.items())})


def set_dotted(config: ml_collections.ConfigDict, key: str, value) -> None:
  """Sets the field ``key`` ("model.depth") of ``config``, which must declare it, or, in a shortcut
  config, a key of the shortcut form that config names."""
  node = config
  *parents, leaf = key.split(".")
  for part in parents:
    if part not in node:
      raise ConfigError(f"override {key!r} names no config field: check the run's overrides")
    node = node[part]
  if leaf not in node:
    parent = ".".join(parents)
    if parent not in SHORTCUT_CONFIGS or "name" not in node:
      raise ConfigError(f"override {key!r} names no config field: check the run's overrides")
    from resjax.models import shortcuts
    known = shortcuts.fields(node.name)
    if leaf not in known:
      raise ConfigError(f"override {key!r} is not a setting of the {node.name!r} shortcut: use "
                        f"one of {', '.join(sorted(known))}")
  with node.ignore_type():
    node[leaf] = value


def declare_shortcut_keys(config: ml_collections.ConfigDict, keys: dict) -> None:
  """Declares each shortcut key among ``keys`` (dotted, as ``--config.KEY`` names them, mapped to
  their values) that some form has and ``config`` leaves out, typed as that form's default, so
  that the command line can set it (``--config.model.shortcut.gate_bias=-5``) whichever forms the
  rows then name. A user's form named there (``--config.model.shortcut.name=FILE.py:CLASS``) is
  imported first, so that its own keys can be set the same way."""
  for key, value in keys.items():
    if key.rpartition(".")[0] in SHORTCUT_CONFIGS and key.endswith(".name") and value:
      from resjax.models import shortcuts
      if shortcuts.is_import_path(value):
        shortcuts.form(value)
  for key in keys:
    parent, _, leaf = key.rpartition(".")
    if parent not in SHORTCUT_CONFIGS:
      continue
    node = config
    for part in parent.split("."):
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf in node:
      continue
    from resjax.models import shortcuts
    forms = [*shortcuts.SHORTCUTS.values(), *shortcuts.USER_FORMS.values()]
    typed = [v for form in forms
             for k, v in getattr(form, "defaults", {}).items() if k == leaf and v is not None]
    if typed:
      node[leaf] = placeholder(type(typed[0]))


def run_config(config: ml_collections.ConfigDict, run, keep: tuple[str, ...] = ()):
  """The experiment's config with one row's overrides applied (the shared ``runs`` list dropped).

  A row's shortcut names are set first, so that the row may then set that form's keys.
  ``keep``: dotted keys the user set on the command line. They win over the row, since a flag the
  user typed must never be dropped silently.
  """
  out = copy.deepcopy(config)
  with out.ignore_type():
    out.runs = []
  names_first = sorted(run.overrides, key=lambda kv: kv[0] not in
                       [c + ".name" for c in SHORTCUT_CONFIGS])
  for key, value in names_first:
    if not any(key == k or key.startswith(k + ".") for k in keep):
      set_dotted(out, key, value)
  return out


def select_runs(config: ml_collections.ConfigDict) -> list:
  """The rows to train: all of them, or the one named by ``config.run``."""
  runs = list(config.runs)
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise ConfigError("two runs share a name: make run names unique in the experiment file")
  wanted = config.get("run")
  if not wanted:
    return runs
  if wanted not in names:
    raise ConfigError(f"unknown run {wanted!r}: use one of {', '.join(names)}")
  return [r for r in runs if r.name == wanted]


def to_steps(amount: float, unit: str, *, train_size: int, batch_size: int) -> int:
  """Converts a duration in the paper's unit ('iterations', 'epochs' or 'examples') to steps."""
  if unit in ("iterations", "steps"):
    return int(amount)
  if unit == "epochs":
    return int(math.ceil(amount * train_size / batch_size))
  if unit == "examples":
    return int(math.ceil(amount / batch_size))
  raise ConfigError(f"unknown duration unit {unit!r}: use iterations, epochs or examples")


def schedule_steps(config, train_size: int) -> dict[str, object]:
  """Total, warm-up, warm-down and decay boundaries of ``config.schedule`` in steps.

  ``warmup_until_error`` (a training error in %, optional) is ResNet-v1's warm-up rule: the warm-up
  LR is held until the running training error falls below it, and ``warmup`` becomes the cap.
  """
  s = config.schedule
  conv = lambda v: to_steps(v, s.unit, train_size=train_size, batch_size=config.batch_size)
  out = {"total": conv(s.total), "warmup": conv(s.get("warmup", 0) or 0),
         "warmdown": conv(s.get("warmdown", 0) or 0),
         "boundaries": [conv(b) for b in s.get("boundaries", ())],
         "warmup_until_error": s.get("warmup_until_error", None)}
  until = out["warmup_until_error"]
  if until is not None:
    if isinstance(until, bool) or not isinstance(until, (int, float)) or not 0 < until <= 100:
      raise ConfigError(f"config.schedule.warmup_until_error={until!r} must be a training error "
                        "in % in (0, 100], e.g. 80.0 (or None for a fixed-length warm-up)")
    if out["warmup"] <= 0:
      raise ConfigError("config.schedule.warmup_until_error needs a cap on the warm-up: set "
                        "config.schedule.warmup to a positive duration (in the schedule's unit)")
  return out



# ------------------------------------------------------------------------------------------------
# Recipes shared by the experiment files: the ResNet papers' CIFAR training and a GPT-2 style
# language model, each with its scale=cpu and scale=test counterparts on offline data. An
# experiment file starts from one and changes what differs.
# ------------------------------------------------------------------------------------------------

def cifar_resnet_recipe(**model) -> ml_collections.ConfigDict:
  """ResNet-v2's CIFAR-10 recipe (He et al. 2016): 64k iterations at batch 128, LR 0.1 divided by 10
  at 32k and 48k, 400 warm-up iterations at 0.01, momentum 0.9, L2 1e-4, pad 4 + crop + flip,
  per-pixel mean subtracted; 5 seeds, median reported; "fail" above 20% test error.

  Shortcuts are option A, as ResNet-v1 §4.2 used on CIFAR ("identity shortcuts in all cases") and
  ResNet-v2 kept for its 110-layer net; rows of bottleneck nets set option B, the projections
  ResNet-v2 used for them.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_seeds = 5
  c.failure_error = 20.0
  c.data = ml_collections.ConfigDict(dict(
      name="cifar10", data_dir=placeholder(str), pad=4, flip=True, train_size=placeholder(int),
      test_size=placeholder(int)))
  c.model = ml_collections.ConfigDict(dict(
      name="cifar_resnet", depth=110, unit="basic", placement="post", widths=(16, 32, 64),
      scan=True, remat="auto", conv_impl="auto", zero_init_residual=False,
      shortcut=dict(name="identity", option="A")))
  c.model.update(model)
  c.batch_size = 128
  c.schedule = ml_collections.ConfigDict(dict(
      unit="iterations", total=64_000, boundaries=(32_000, 48_000), warmup=400,
      warmup_until_error=placeholder(float)))
  c.optim = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.1, warmup_lr=0.01, decay="step", decay_factor=0.1, momentum=0.9,
      weight_decay=1e-4))
  c.log_every, c.eval_every, c.checkpoint_every = 100, 2_000, 2_000
  c.eval_batch_size = 500
  return c


def digits_cpu(c: ml_collections.ConfigDict, *, total: int = 230) -> None:
  """scale=cpu for a CIFAR recipe: the offline 8x8 digits, 3 seeds side by side, 230 iterations.

  Digits are 8x8 grey: pad 1 is CIFAR's 4/32, and flips would turn digits into other shapes.
  Batch 64; a warm-up of a sixth of the run at a tenth of the LR; decays at 70% and 89% of the
  run (the paper's 50% / 75% would leave the short run too little time at the full LR).

  The peak LR was tuned on ResNet-v2 Figure 2's row (a) alone (identity ResNet-110, option A),
  as the papers tuned their recipe on the original net, then kept for every row of every file.
  Tuning used seeds 100-102, apart from the seeds 0-2 the tables report; final test error %:

    LR 0.05 (0.1 scaled to batch 64, the recipe before): 46.67 / 10.67 / 17.33 (loss jumps
            from ~1.8 to ~5 once the warm-up ends; BN statistics wrecked)
    LR 0.03: 11.67 / 10.33 / 67.00      LR 0.02: 4.33 / 4.33 / 4.33
    LR 0.01: 3.00 / 2.33 / 4.00  <- chosen: lowest median, every seed trained
    LR 0.005: 5.67 / 5.00 / 6.33 (still falling at the end: too slow for 230 iterations)

    LR 0.05 after a 100-step linear ramp: 6.67 / 56.33 / 4.67
    LR 0.05 after ResNet-v1's rule (0.005 until the running training error is below 80%, cap
            100 steps): the rule ended the warm-up at steps 30 / 21 / 37; 22.67 / 70.00 / 30.67

  A longer or gentler warm-up does not save LR 0.05: the peak LR itself is too high for a
  110-layer post-activation net at this batch and data size.
  """
  c.data.update(name="digits", pad=1, flip=False)
  c.num_seeds = 3
  c.batch_size = 64
  c.optim.update(lr=0.01, warmup_lr=0.001)
  c.schedule.update(unit="iterations", total=total,
                    boundaries=(int(total * 0.7), int(total * 0.89)), warmup=max(1, total // 6))
  # Ten evaluations of the 300 test digits per run: curves, not end points, in figure.png.
  c.log_every, c.eval_every, c.checkpoint_every = total // 23, total // 10, total // 2


def digits_test(c: ml_collections.ConfigDict) -> None:
  """scale=test: a few steps on digits, for pytest."""
  digits_cpu(c)
  c.num_seeds = 1
  c.batch_size = 32
  c.schedule.update(total=4, boundaries=(3,), warmup=1)
  c.log_every, c.eval_every, c.checkpoint_every = 2, 4, 4


def lm_recipe(**model) -> ml_collections.ConfigDict:
  """GPT-2 small with AdamW on byte-level lm1b (not the modded-nanogpt record's model or optimizer:
  those are ``record_recipe``): Pre-LN, learned positions, tied head, context 1024, 3200 steps at
  batch 512, AdamW (LR 6e-4, betas 0.9/0.95, weight decay 0.1, clip 1.0, 200 linear warm-up
  steps, cosine decay to a tenth), learnable residual scalars at LR 0.02; 3 seeds; test loss in
  nats per byte, no failure line.
  ``model``: what differs from GPT-2 small (``resjax.models.transformer`` documents every key).
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_seeds = 3
  c.metric = "test_loss"
  c.report = "compare"
  c.failure_error = None
  # val_tokens is read by data.name=fineweb alone (None: the record's 10,485,760); declared here
  # so that --config.data.val_tokens can set it.
  c.data = ml_collections.ConfigDict(dict(
      name="lm1b", data_dir=placeholder(str), max_train_bytes=2_000_000_000,
      max_test_bytes=20_000_000, max_eval_windows=2048, val_tokens=placeholder(int)))
  c.model = ml_collections.ConfigDict(dict(
      name="transformer", vocab_size=placeholder(int), context=1024, width=768, depth=12, heads=12,
      mlp_ratio=4, positions="learned", tie_head=True, norm="pre", norm_kind="layernorm",
      embed_norm=False, activation="gelu", qk_norm=False, bias=True, parallel=False,
      shortcut=dict(name="identity"), value_residual=dict(name="none"),
      value_residual_first=False, embed_shortcut=False, embed_shortcut_first=False,
      embed_shortcut_init=(1.0, 0.0), dropout=0.0, scan=True, remat="none", dtype="float32",
      init="gpt2", scaled_out_init=None, zero_init_out=False, zero_init_head=False))
  c.model.update(model)
  c.batch_size = 512
  c.schedule = ml_collections.ConfigDict(dict(unit="iterations", total=3200, warmup=200,
                                              boundaries=()))
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=6e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
      decay="cosine", warmup_shape="linear", final_lr_fraction=0.1, scalar_lr=0.02))
  c.log_every, c.eval_every, c.checkpoint_every = 50, 400, 400
  c.eval_batch_size = 64
  return c


# The optimizer of the modded-nanogpt record of 2024-11-06 (``resjax.optim``): Muon on the blocks'
# matrices, Adam on the token embedding, the untied head and the blocks' scalars, no weight decay,
# no clipping; its schedule holds every group's LR, then a linear warm-down to 0 over the last 914
# of 3200 steps. make_optimizer takes these values for the keys a muon config leaves out.
# The Transformer of the modded-nanogpt record of 2024-11-06 (records/track_1_short/
# 2024-11-06_ShortcutsTweaks, train_gpt2.py) as lm_recipe's model keys: 12 blocks of width 768, 6
# heads of 128, rotary, RMSNorm without gain (also on the embedding), QK-norm, ReLU^2, no biases,
# PyTorch's default init, zero-initialised output projections and untied head, the value residual
# (mix, in every block) and the embedding shortcut x <- a x + b x0 at every block.
RECORD_MODEL = dict(
    context=1024, width=768, depth=12, heads=6, mlp_ratio=4, positions="rotary", tie_head=False,
    norm="pre", norm_kind="rmsnorm", embed_norm=True, activation="relu2", qk_norm=True,
    bias=False, init="pytorch", zero_init_out=True, zero_init_head=True,
    shortcut=dict(name="identity"), value_residual=dict(name="mix"), value_residual_first=True,
    embed_shortcut=True, embed_shortcut_first=True, embed_shortcut_init=(1.0, 0.0))

# The record's ablation chain: (row, the row before it, what the row adds); each step lowered the
# validation loss (one run each). experiments/value_residual.py and value_residual_gpt2.py claim it.
RECORD_CHAIN = (("fixed_vr", "baseline", "the fixed value residual"),
                ("learnable_vr", "fixed_vr", "a learnable lambda"),
                ("embed_shortcut", "learnable_vr", "the embedding shortcut"))

MUON = dict(name="muon", lr=0.02, momentum=0.95, nesterov=True, embed_lr=0.3, head_lr=0.002,
            scalar_lr=0.02, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, decay="linear_warmdown")
RECORD_WARMDOWN, RECORD_STEPS = 914, 3200


def muon_optim(c: ml_collections.ConfigDict) -> None:
  """The record's optimizer and schedule on an LM recipe, after its ``schedule.total`` is set:
  config.optim becomes ``MUON``, no warm-up, the warm-down the record's share of the run (914 of
  3200 steps)."""
  c.optim = ml_collections.ConfigDict(MUON)
  warmdown = c.schedule.total * RECORD_WARMDOWN / RECORD_STEPS
  if c.schedule.unit in ("iterations", "steps"):
    warmdown = round(warmdown)
  c.schedule.update(warmup=0, warmdown=warmdown)


def record_recipe(**model) -> ml_collections.ConfigDict:
  """The modded-nanogpt record of 2024-11-06 as it trained: its Transformer (``RECORD_MODEL``) in
  bfloat16 matmuls (the record's autocast) on FineWeb GPT-2 tokens (``data.name=fineweb``; set
  ``data.data_dir``), 3200 steps of 8 x 64 sequences of 1024 tokens, validation on the first
  10,485,760 val tokens, Muon and three Adams with no warm-up and a linear warm-down over the last
  914 steps (``muon_optim``); 3 seeds, one after another (one seed's 512 x 1024 x 50304 float32
  logits are 105 GB across the devices already). ``model``: what differs from the record's."""
  c = lm_recipe(**{**RECORD_MODEL, "dtype": "bfloat16", **model})
  c.data.name = "fineweb"
  c.batch_size = 512
  c.schedule.update(total=RECORD_STEPS, warmup=0)
  muon_optim(c)
  c.seeds_side_by_side = False
  c.log_every, c.eval_every, c.checkpoint_every = 50, 125, 400  # the record's val_loss_every
  c.eval_batch_size = 64
  return c


def lm_cpu(c: ml_collections.ConfigDict, *, eval_windows: int = 1024) -> None:
  """scale=cpu for an LM recipe: the byte corpus of Python's own standard library (offline, split
  by file), 3 seeds side by side, LR 3e-3, ``eval_windows`` test windows. The experiment file sets
  the model's size, the batch, the schedule and the logging cadence."""
  c.data.update(name="stdlib", max_train_bytes=placeholder(int), max_test_bytes=placeholder(int),
                max_eval_windows=eval_windows)
  c.num_seeds = 3
  c.optim.lr = 3e-3
  c.eval_batch_size = 256


def lm_test(c: ml_collections.ConfigDict, *, eval_windows: int = 64) -> None:
  """scale=test, after ``lm_cpu``: 2 seeds at batch 8, logging at step 2 and evaluating at 4, for
  pytest. The experiment file sets the model's size and the schedule."""
  c.data.max_eval_windows = eval_windows
  c.num_seeds = 2
  c.batch_size = 8
  c.log_every, c.eval_every, c.checkpoint_every = 2, 4, 4
  c.eval_batch_size = 32


# ------------------------------------------------------------------------------------------------
# The caution at depth: one recipe per family, shared by experiments/caution_depth_resnet.py,
# experiments/caution_depth.py and ``python -m resjax.caution``, which trains every form on it.
# ------------------------------------------------------------------------------------------------

def caution_resnet(scale: str) -> tuple[ml_collections.ConfigDict, tuple[int, ...]]:
  """CIFAR ResNets (post-activation basic units, option A) and their depths in layers.

  paper: ResNet-v2's CIFAR-10 recipe (``cifar_resnet_recipe``, 5 seeds) at 20, 56, 110, 218 and
  1202 layers, the deepest plain-unit net ResNet-v1 trained (§4.2). cpu: the 8x8 digits with
  ``digits_cpu`` (3 seeds) at 20, 56, 110. test: ``digits_test`` at 8 and 14, for pytest.
  """
  c = cifar_resnet_recipe()
  c.scale = scale
  depths = (20, 56, 110, 218, 1202)
  if scale == "cpu":
    digits_cpu(c)
    depths = (20, 56, 110)
  elif scale == "test":
    digits_test(c)
    depths = (8, 14)
  return c, depths


def caution_lm(scale: str) -> tuple[ml_collections.ConfigDict, tuple[int, ...]]:
  """Pre-LN Transformer LMs (``lm_recipe``) and their depths in blocks.

  paper: width 512 (8 heads), context 256, batch 64, 10k steps of AdamW (500 warm-up, LR 1e-3,
  scalars 0.01) on byte-level lm1b, 2 to 256 blocks, 3 seeds. cpu: width 32 (2 heads), context 32,
  batch 32, 200 steps (20 warm-up) on the standard-library corpus (``lm_cpu``), 1, 4, 16 blocks.
  test: width 16, context 8, 3 steps, 1 and 2 blocks, for pytest.
  """
  c = lm_recipe(context=256, width=512, depth=2, heads=8)
  c.scale = scale
  c.num_seeds = 3
  c.batch_size = 64
  c.schedule.update(total=10_000, warmup=500)
  c.optim.update(lr=1e-3, scalar_lr=0.01)
  c.log_every, c.eval_every, c.checkpoint_every = 100, 2000, 2000
  depths = (2, 8, 32, 128, 256)
  if scale in ("cpu", "test"):
    lm_cpu(c, eval_windows=512)
    c.model.update(context=32, width=32, heads=2)
    c.batch_size = 32
    c.schedule.update(total=200, warmup=20)
    c.log_every, c.eval_every, c.checkpoint_every = 50, 200, 200
    depths = (1, 4, 16)
  if scale == "test":
    lm_test(c, eval_windows=32)
    c.model.update(context=8, width=16)
    c.schedule.update(total=3, warmup=1)
    c.log_every, c.eval_every, c.checkpoint_every = 3, 3, 3
    depths = (1, 2)
  return c, depths
