"""What a run's model is, without training it: parameter count and forward FLOPs per example.

FLOPs come from XLA's cost analysis of the compiled forward pass. XLA counts a scanned loop's body
once, not once per iteration, so the count is taken on the same model with one and with two units
per stage (both exact: a scan of length one is counted right) and extended linearly to the real
depth, since the program that runs costs the same for every repeated unit.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
from flax import nnx

from resjax import configs, models, sharding, train
from resjax.data import fineweb
from resjax.models import shortcuts
from resjax.errors import ConfigError

# (height, width, channels, classes) of each image dataset, known without reading it.
IMAGE_SPECS = {"digits": (8, 8, 1, 10), "cifar10": (32, 32, 3, 10), "cifar100": (32, 32, 3, 100),
               "imagenet2012": (224, 224, 3, 1000)}
TEXT_SETS = ("stdlib", "tiny_shakespeare", "lm1b")
BYTE_VOCAB = 256
TOKEN_VOCABS = {"fineweb": fineweb.VOCAB_SIZE}  # token streams: name -> the model's vocabulary


def input_spec(config) -> tuple[jax.ShapeDtypeStruct, int, int]:
  """(one example's input, number of classes or vocabulary, input channels) of ``config.data``."""
  name = config.data.name
  if name in TEXT_SETS or name in TOKEN_VOCABS:
    vocab = TOKEN_VOCABS.get(name, BYTE_VOCAB)
    return jax.ShapeDtypeStruct((config.model.context,), jnp.int32), vocab, 0
  if name not in IMAGE_SPECS:
    raise ConfigError(f"unknown dataset {name!r}: set config.data.name to one of "
                      f"{', '.join(list(IMAGE_SPECS) + list(TEXT_SETS) + list(TOKEN_VOCABS))}")
  h, w, c, classes = IMAGE_SPECS[name]
  if name == "imagenet2012":
    h = w = config.data.get("image_size", 224)
  return jax.ShapeDtypeStruct((h, w, c), jnp.float32), classes, c


def abstract_model(config, model_cfg=None):
  _, classes, channels = input_spec(config)
  return nnx.eval_shape(lambda: models.build(model_cfg or config.model, num_classes=classes,
                                             in_channels=channels, rngs=nnx.Rngs(0)))


def check_user_forms(config) -> None:
  """Runs each user's shortcut form the model names through ``shortcuts.check_form`` on the
  inputs its units give it (tokens in a Transformer, images in a ResNet)."""
  sequence = config.data.name in TEXT_SETS or config.data.name in TOKEN_VOCABS
  kind = "tokens" if sequence else "images"
  for key in configs.SHORTCUT_CONFIGS:
    cfg = config
    for part in key.split("."):
      cfg = cfg.get(part) if cfg is not None else None
    name = cfg.get("name") if cfg is not None else None
    if name not in (None, "none") and shortcuts.is_user_form(name):
      shortcuts.check_form(cfg, kinds=(kind,))


def check(config) -> None:
  """Raises ConfigError for any value that cannot work, before anything is trained."""
  check_user_forms(config)
  abstract_model(config)
  # Intervals are in steps and the eval batch in examples; 0 would divide by zero mid-run.
  for key in ("batch_size", "log_every", "eval_every", "checkpoint_every", "eval_batch_size"):
    value = config.get(key, 1)  # the trainer has defaults for all but batch_size
    if isinstance(value, bool) or not (isinstance(value, int) and value > 0):
      raise ConfigError(f"config.{key}={value!r} must be a positive integer: set "
                        f"--config.{key} to 1 or more")
  min_size = config.get("fsdp_min_size", 1)
  if isinstance(min_size, bool) or not (isinstance(min_size, int) and min_size >= 0):
    raise ConfigError(f"config.fsdp_min_size={min_size!r} must be a whole number of elements: set "
                      "--config.fsdp_min_size to 0 or more")
  if not isinstance(config.get("seeds_side_by_side", True), bool):
    raise ConfigError(f"config.seeds_side_by_side={config.seeds_side_by_side!r}: set it to True "
                      "or False")
  s = config.schedule
  if not (s.total > 0):
    raise ConfigError(f"config.schedule.total={s.total} must be positive")
  if list(s.get("boundaries", ())) != sorted(s.get("boundaries", ())):
    raise ConfigError("config.schedule.boundaries must be increasing")
  train.make_optimizer(config, configs.schedule_steps(config, train_size=1 << 20))
  if config.num_seeds < 1:
    raise ConfigError(f"config.num_seeds={config.num_seeds} must be at least 1")


def check_sharding(config, mesh) -> None:
  """Raises ConfigError where ``config.sharding_rules`` cannot shard a parameter of the run's
  model on ``mesh`` (a bad regex or rule, an axis the mesh lacks, a split that does not divide)."""
  _, params, _ = train.split_model(abstract_model(config))
  sharding.state_specs({"params": params}, sharding.axis_sizes(mesh),
                       config.get("sharding_rules", sharding.DEFAULT_RULES),
                       fsdp_min_size=config.get("fsdp_min_size", sharding.FSDP_MIN_SIZE))


def xla_forward_flops(model_cfg, example, num_classes: int, in_channels: int) -> float:
  """XLA's cost analysis of one ``example``'s forward pass through the model of ``model_cfg``.

  Counted on XLA's convolution: im2col and conv_rows compute the same function, but the cost
  analysis counts an elementwise op feeding a matmul once per patch copy. XLA counts only the
  multiply-adds that meet real pixels, not the zero padding. Counted on the program as lowered,
  before a backend's passes: XLA:GPU's turn convolutions and matmuls into library calls that its
  compiled cost analysis leaves out (ResNet-50 counted at 1% of its FLOPs on an H200), and its
  fusions count a recomputed op again.
  """
  model_cfg = copy.deepcopy(model_cfg)
  if model_cfg.name != "transformer":
    with model_cfg.unlocked():
      model_cfg.conv_impl = "xla"
  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.build(
      model_cfg, num_classes=num_classes, in_channels=in_channels, rngs=nnx.Rngs(0))))
  fwd = lambda s, x: nnx.merge(graphdef, s)(x, train=False)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
  one = jax.ShapeDtypeStruct((1, *example.shape), example.dtype)
  cost = jax.jit(fwd).lower(abstract, one).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def forward_flops(config, model_cfg) -> float:
  """``xla_forward_flops`` on the input of ``config.data``."""
  example, classes, channels = input_spec(config)
  return xla_forward_flops(model_cfg, example, classes, channels)


def flops_at_depth(model_cfg, count) -> float:
  """Forward FLOPs of the real depth from ``count(cfg)`` on nets with 1 and 2 units per stack
  (XLA counts a scanned body once): each further unit of a stack costs what its second one adds."""
  one, n = models.with_repeats(model_cfg, 1)
  f1 = count(one)
  if isinstance(n, int):  # every stack repeats its unit n times
    return f1 + (n - 1) * (count(models.with_repeats(model_cfg, 2)[0]) - f1)
  flops = f1  # stacks of different lengths: one more unit in stack s at a time
  for s, n_s in enumerate(n):
    if n_s > 1:
      k = tuple(2 if i == s else 1 for i in range(len(n)))
      flops += (n_s - 1) * (count(models.with_repeats(model_cfg, k)[0]) - f1)
  return flops


def describe(config) -> dict:
  check(config)
  model = abstract_model(config)
  params = train.count_params(model)
  flops = flops_at_depth(config.model, lambda cfg: forward_flops(config, cfg))
  out = {"params": params, "forward_flops_per_example": flops}
  if config.model.name == "transformer" and config.get("reference_step", None):
    out.update(step_utilisation(flops, config))
  return {**out, "model": config.model.to_dict()}


def step_utilisation(forward_flops: float, config) -> dict:
  """FLOPs per token and per training step (backward = 2 x forward, the usual count), and the
  model FLOPs utilisation they imply at ``config.reference_step``: a logged step time on
  ``devices`` devices of ``peak_flops`` each (an experiment file names its source)."""
  ref = config.reference_step
  per_token = forward_flops / config.model.context
  step = 3.0 * forward_flops * config.batch_size
  return {"forward_flops_per_token": per_token, "train_flops_per_token": 3.0 * per_token,
          "train_flops_per_step": step, "reference_step": ref.to_dict(),
          "mfu_at_reference_step": step / (ref.seconds * ref.devices * ref.peak_flops)}
