"""What a run learns from: the data on the device, how a step's batch is drawn, and the loss.

A task turns ``config.data`` into three things the trainer needs and nothing else:

* ``train_batch(seed, step, batch_size)``: the host's part of one training batch, a fixed function of
  (seed, step) so that a resumed run sees exactly the batches an uninterrupted one would;
* ``train_inputs(arrays, batch, key)`` and ``eval_inputs(arrays, batch)``: traced inside the jitted
  step, they turn that batch and the device-resident ``arrays`` into model inputs and targets;
* ``eval_batches(batch_size)``: the test split as padded batches with a validity mask.

A task that streams from stateful loaders also has ``iterator`` (``get_state`` / ``set_state``, as
grain's orbax handler calls them), which the trainer saves in each checkpoint.

The loss is cross-entropy over the last axis for every task (a class per image, a byte or a GPT-2
token per position), so one training step serves ResNets and Transformers alike.

==================  ===============================================  ================================
config.data.name    data                                             task
==================  ===============================================  ================================
digits, cifar10/100 held on the device as uint8, augmented in JAX    ``ImageTask``
imagenet2012        decoded and augmented on the host, streamed      ``StreamImageTask``
stdlib, tiny_sh...  bytes held on the device, random windows         ``TextTask``
fineweb             GPT-2 token shards mapped on the host, streamed  ``TokenStreamTask``
==================  ===============================================  ================================
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from resjax.data import fineweb, imagenet, images, text
from resjax.errors import ConfigError, quiet_logs

IMAGE_SETS = ("digits", "cifar10", "cifar100")
STREAMED_IMAGE_SETS = ("imagenet2012",)
TEXT_SETS = ("stdlib", "tiny_shakespeare", "lm1b")
TOKEN_STREAMS = ("fineweb",)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def batch_indices(seed: int, step: int, num_examples: int, batch_size: int) -> np.ndarray:
  """Epoch-wise shuffled indices: a fixed function of (seed, step)."""
  per_epoch = num_examples // batch_size
  epoch, j = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return order[j * batch_size:(j + 1) * batch_size].astype(np.int32)


def _padded(count: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(indices, valid) covering range(count) in batches of one shape (the last one padded)."""
  for start in range(0, count, batch_size):
    idx = np.arange(start, start + batch_size)
    valid = idx < count
    yield np.minimum(idx, count - 1).astype(np.int32), valid


class ImageTask:
  """Image classification on a dataset small enough to live on the device (digits, CIFAR)."""

  kind = "image"
  sequence = False
  host_local_batches = False  # every process draws the whole batch of indices

  def __init__(self, data_cfg, splits):
    self.splits = splits
    self.pad = int(data_cfg.get("pad", 0))
    self.flip = bool(data_cfg.get("flip", False))
    self.num_classes = splits.num_classes
    self.in_channels = splits.train_images.shape[-1]
    self.train_size = len(splits.train_labels)
    self.test_size = len(splits.test_labels)
    self.input_shape = splits.train_images.shape[1:]

  def device_arrays(self) -> dict:
    s = self.splits
    return {"train_x": jnp.asarray(s.train_images), "train_y": jnp.asarray(s.train_labels),
            "test_x": jnp.asarray(s.test_images), "test_y": jnp.asarray(s.test_labels),
            "mean": jnp.asarray(s.mean)}

  def train_batch(self, seed: int, step: int, batch_size: int) -> np.ndarray:
    return batch_indices(seed, step, self.train_size, batch_size)

  def train_inputs(self, arrays, idx, key):
    x = images.normalize(arrays["train_x"][idx], arrays["mean"])
    return images.augment(key, x, pad=self.pad, flip=self.flip), arrays["train_y"][idx]

  def eval_batches(self, batch_size: int):
    return _padded(self.test_size, batch_size)

  def eval_inputs(self, arrays, idx):
    return images.normalize(arrays["test_x"][idx], arrays["mean"]), arrays["test_y"][idx]


class StreamImageTask:
  """ImageNet: decoded and augmented on the host (scale augmentation, crops), normalised on device."""

  kind = "image"
  sequence = False
  host_local_batches = True  # each process decodes its own rows

  def __init__(self, data_cfg):
    self.train = imagenet.ImageNetSource(data_cfg, "train")
    self.iterator = self.train  # its streams' state: the trainer checkpoints it (grain's handler)
    self.test = imagenet.ImageNetSource(data_cfg, data_cfg.get("eval_split", "validation"))
    self.num_classes = self.train.num_classes
    self.in_channels = 3
    self.train_size = self.train.num_examples
    self.test_size = self.test.num_examples
    size = int(data_cfg.get("image_size", 224))
    self.input_shape = (size, size, 3)

  def device_arrays(self) -> dict:
    return {"mean": jnp.asarray(self.train.mean, jnp.float32),
            "std": jnp.asarray(self.train.std, jnp.float32)}

  def train_batch(self, seed: int, step: int, batch_size: int):
    return self.train.train_batch(seed, step, batch_size, jax.process_index(), jax.process_count())

  def _normalize(self, arrays, x):
    return (x.astype(jnp.float32) / 255.0 - arrays["mean"]) / arrays["std"]

  def train_inputs(self, arrays, batch, key):
    del key  # augmented on the host
    x, y = batch
    return self._normalize(arrays, x), y

  def eval_batches(self, batch_size: int):
    for x, y, valid in self.test.eval_batches(batch_size, jax.process_index(), jax.process_count()):
      yield (x, y), valid

  def eval_inputs(self, arrays, batch):
    x, y = batch
    return self._normalize(arrays, x), y


class TextTask:
  """Byte-level language modelling: predict each next byte of random windows of the corpus."""

  kind = "text"
  sequence = True
  host_local_batches = False

  def __init__(self, data_cfg, splits, context: int):
    self.splits = splits
    self.context = int(context)
    if len(splits.train) <= self.context + 1 or len(splits.test) <= self.context + 1:
      raise ConfigError(f"the {splits.name} splits ({len(splits.train)} / {len(splits.test)} bytes) "
                        f"are shorter than one window of context {self.context}: lower "
                        "config.model.context or raise config.data.max_*_bytes")
    self.num_classes = splits.vocab_size
    self.in_channels = 0
    # One "example" is one window; epochs in the schedule count windows of the train split.
    self.train_size = len(splits.train) // self.context
    self.max_eval_windows = data_cfg.get("max_eval_windows", None)
    self.input_shape = (self.context,)

  def device_arrays(self) -> dict:
    return {"train": jnp.asarray(self.splits.train), "test": jnp.asarray(self.splits.test)}

  def train_batch(self, seed: int, step: int, batch_size: int) -> np.ndarray:
    return text.window_starts(seed, step, len(self.splits.train), batch_size, self.context)

  def train_inputs(self, arrays, starts, key):
    del key
    return text.gather_windows(arrays["train"], starts, self.context)

  def eval_batches(self, batch_size: int):
    starts = text.eval_starts(len(self.splits.test), self.context, self.max_eval_windows)
    for idx, valid in _padded(len(starts), batch_size):
      yield starts[idx], valid

  def eval_inputs(self, arrays, starts):
    return text.gather_windows(arrays["test"], starts, self.context)


class TokenStreamTask:
  """Language modelling on FineWeb's GPT-2 tokens, read as the modded-nanogpt record reads them.

  The shards stay on the host, memory-mapped; each step's windows are cut there from the step
  alone (``fineweb.TrainStream``) and sent to the device, the same for every seed of a row. Of
  ``config.data`` it reads ``data_dir`` and ``val_tokens``; the byte sets' caps (max_*_bytes,
  max_eval_windows) do not apply.
  """

  kind = "tokens"  # losses in nats per token; no bits per byte
  sequence = True
  host_local_batches = False  # each process cuts the whole batch (1 MB at the record's)

  def __init__(self, data_cfg, context: int, batch_size: int | None = None):
    data_dir = fineweb.check_data_dir(data_cfg.get("data_dir", None))
    self.context = int(context)
    self.train = fineweb.Shards(data_dir, "train")
    self.val = fineweb.ValWindows(fineweb.Shards(data_dir, "val"), self.context,
                                  fineweb.check_val_tokens(data_cfg.get("val_tokens", None)))
    self.num_classes = fineweb.VOCAB_SIZE
    self.in_channels = 0
    # One "example" is one window; epochs in the schedule count windows of the train shards.
    self.train_size = self.train.num_tokens // self.context
    self.test_size = self.val.count
    self.input_shape = (self.context,)
    self._streams: dict[int, fineweb.TrainStream] = {}
    if batch_size:  # a shard shorter than one batch is reported now, not at the first step
      self._stream(int(batch_size))

  def _stream(self, batch_size: int) -> fineweb.TrainStream:
    if batch_size not in self._streams:
      self._streams[batch_size] = fineweb.TrainStream(self.train, batch_size, self.context)
    return self._streams[batch_size]

  def device_arrays(self) -> dict:
    return {}

  def train_batch(self, seed: int, step: int, batch_size: int) -> np.ndarray:
    del seed  # one stream for every seed: paired seeds differ only in their initialisation
    return self._stream(batch_size).batch(step)

  def train_inputs(self, arrays, windows, key):
    del arrays, key
    return text.split_windows(windows)

  def eval_batches(self, batch_size: int):
    for idx, valid in _padded(self.val.count, batch_size):
      yield self.val.windows(idx), valid

  def eval_inputs(self, arrays, windows):
    del arrays
    return text.split_windows(windows)


def load(config):
  """The task of ``config`` (raises DatasetNotPrepared / ConfigError with the fix in one line)."""
  name = config.data.name
  if name in IMAGE_SETS:
    return ImageTask(config.data, images.load_images(config.data))
  if name in STREAMED_IMAGE_SETS:
    return StreamImageTask(config.data)
  if name in TEXT_SETS:
    return TextTask(config.data, text.load_text(config.data), config.model.context)
  if name in TOKEN_STREAMS:
    return TokenStreamTask(config.data, config.model.context, config.get("batch_size", None))
  known = IMAGE_SETS + STREAMED_IMAGE_SETS + TEXT_SETS + TOKEN_STREAMS
  raise ConfigError(f"unknown dataset {name!r}: set config.data.name to one of {', '.join(known)}")


def task_key(config) -> str:
  """Runs with equal data config (and context, for text) share one loaded task."""
  return json.dumps([config.data.to_dict(), config.model.get("context", None)], sort_keys=True,
                    default=str)


def load_all(run_configs: Iterable) -> dict:
  """One task per distinct ``task_key``: data read once however many rows share it."""
  out: dict[str, object] = {}
  for rc in run_configs:
    k = task_key(rc)
    if k not in out:
      with quiet_logs():  # TFDS warns about missing folders before we say how to prepare them
        out[k] = load(rc)
  return out


def bits_per_byte(nats: float) -> float:
  """A byte-level model's loss in bits per byte (one token is one byte)."""
  return nats / math.log(2.0)
