"""ImageNet (ILSVRC2012) through TFDS imagenet2012, decoded and augmented by grain workers.

The ResNet papers' recipe (He et al. 2015, Sec. 3.4), at `image_size` S (224 in the papers):
- train: the shorter side is resized to a size drawn uniformly from the integers in [256, 480],
  an SxS crop is taken at a uniform offset, and mirrored left-right with probability 1/2; then
  AlexNet's PCA lighting noise (the papers' "standard color augmentation"): each image gets
  255 * V (alpha * lambda) added to every pixel, alpha ~ N(0, lighting_std^2) per component,
  with (lambda, V) the eigenvalues and eigenvectors (columns) of the covariance of ImageNet
  training RGB pixels in [0, 1] units; rounded and clipped back to uint8. lighting_std = 0.1 as
  in AlexNet; 0 turns it off. No other colour jitter.
- eval: the shorter side is resized to 256 and the centre SxS crop kept (a single crop; the
  papers' 10-crop and multi-scale test numbers are not what this reproduces).
The side lengths 256, 480 and 256 scale with S / 224, rounded, so small images keep the recipe.

Resizing is Pillow's antialiased bilinear filter, evaluated only on the crop's box (the same
pixels as resizing the whole image and cropping); JPEGs are first decoded at a reduced scale
(`draft`) when the target is at most half their size. Records are read by random access with
their JPEG bytes left encoded (`tfds.data_source`, no TensorFlow). A grain MapDataset maps each
step to its batch, and `config.data.num_workers` grain worker processes make the batches: of W
workers, worker w makes every W-th batch from the stream's w-th, holding one done while it makes
the next, and the trainer takes them in step order. Each seed's stream (a replica of the run) has
its own workers. With 0 workers the trainer's process makes them, the next one on a thread
(`prefetch`).

Every batch is a fixed function of its arguments, never of history, worker count or timing: the
training stream visits the examples in a permutation drawn from (seed, epoch), step k takes
positions [k B, (k + 1) B) of that stream (B the global batch), host p of P takes the p-th of P
equal slices, and the augmentation of the example at position i of the global batch draws from
a generator seeded by (seed, step, i). So P hosts together see exactly the batch one host would,
and a resumed run sees the same batches: the position of each seed's stream (grain's iterator
state) is saved in the run's checkpoint (`get_state` / `set_state`), and a checkpoint without it
resumes the same stream from its step.

Images leave the host as uint8; `normalize` maps them to float on device with the per-channel
MEAN_RGB and STD_RGB.
"""

import gc
import io
import json
import math
import os
import threading

import jax.numpy as jnp
import numpy as np

from resjax.data import prepare
from resjax.errors import ConfigError

DATASET = "imagenet2012"
NUM_CLASSES = 1000
TRAIN_SPLIT, EVAL_SPLIT = "train", "validation"

# The papers' sizes at 224 pixels (He et al. 2015, Sec. 3.4).
PAPER_IMAGE_SIZE = 224
PAPER_TRAIN_SHORT_SIDE = (256, 480)
PAPER_EVAL_SHORT_SIDE = 256

# Per-channel mean and standard deviation of ImageNet training pixels, in [0, 1] units.
MEAN_RGB = np.array([0.485, 0.456, 0.406], np.float32)
STD_RGB = np.array([0.229, 0.224, 0.225], np.float32)

# Eigen-decomposition of the covariance of ImageNet training RGB pixels in [0, 1] units: the
# eigenvalues, and the eigenvectors as the columns of LIGHTING_EIGVEC (the first is the
# luminance direction).
LIGHTING_EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float64)
LIGHTING_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                            [-0.5808, -0.0045, -0.8140],
                            [-0.5836, -0.6948, 0.4203]], np.float64)
DEFAULT_LIGHTING_STD = 0.1

# Streams of the seed, so that the example order and the augmentation never share draws.
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1


def normalize(images, mean=MEAN_RGB, std=STD_RGB):
  """Maps uint8 images [..., 3] to float32 `(images / 255 - mean) / std`; jit-able."""
  scaled = jnp.asarray(images, jnp.float32) / 255.0 - jnp.asarray(mean, jnp.float32)
  return scaled / jnp.asarray(std, jnp.float32)


# --------------------------------------------------------------------------- one image


def _scaled(side: int, image_size: int) -> int:
  return int(round(side * image_size / PAPER_IMAGE_SIZE))


def open_image(image):
  """A Pillow image from what the data source returns: encoded bytes or a uint8 array."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(image, np.ndarray) and image.dtype.kind in "SO" and image.ndim == 0:
    image = image.item()  # A 0-d array holding the encoded bytes.
  if isinstance(image, (bytes, bytearray, memoryview)):
    return Image.open(io.BytesIO(image))
  array = np.asarray(image, np.uint8)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  return Image.fromarray(array)


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
  """(height, width) after resizing the shorter side to `short_side`, keeping the aspect ratio."""
  scale = short_side / min(height, width)
  return max(short_side, round(height * scale)), max(short_side, round(width * scale))


def resized_crop(image, resized: tuple[int, int], top: int, left: int, size: int) -> np.ndarray:
  """The size x size crop at (top, left) of `image` (Pillow) resized to `resized` (h, w); RGB.

  Only the crop's box is resampled, which gives the pixels of resizing the whole image first.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  new_h, new_w = resized
  # JPEG only: decode at 1/2, 1/4 or 1/8 scale when that still covers the target size.
  image.draft("RGB", (new_w, new_h))
  if image.mode != "RGB":
    image = image.convert("RGB")
  width, height = image.size
  if (width, height) == (new_w, new_h):
    return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)
  sx, sy = width / new_w, height / new_h
  box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
  return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=box), np.uint8)


def eval_image(image, *, size: int, short_side: int) -> np.ndarray:
  """Shorter side resized to `short_side`, then the centre size x size crop; uint8 [S, S, 3]."""
  image = open_image(image)
  new_h, new_w = resized_size(image.size[1], image.size[0], short_side)
  return resized_crop(image, (new_h, new_w), (new_h - size) // 2, (new_w - size) // 2, size)


def train_crop(rng: np.random.Generator, height: int, width: int, size: int,
               short_side_range: tuple[int, int]):
  """Draws the scale augmentation of one image: (resized (h, w), top, left, flip)."""
  short_side = int(rng.integers(short_side_range[0], short_side_range[1] + 1))
  new_h, new_w = resized_size(height, width, short_side)
  top = int(rng.integers(0, new_h - size + 1))
  left = int(rng.integers(0, new_w - size + 1))
  flip = bool(rng.random() < 0.5)
  return (new_h, new_w), top, left, flip


def lighting(image: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
  """AlexNet's PCA lighting noise: one RGB offset added to every pixel, rounded and clipped."""
  alpha = rng.normal(0.0, std, size=3)
  offset = 255.0 * (LIGHTING_EIGVEC @ (alpha * LIGHTING_EIGVAL))
  return np.clip(np.round(image + offset), 0, 255).astype(np.uint8)


def train_image(image, rng: np.random.Generator, *, size: int,
                short_side_range: tuple[int, int], lighting_std: float) -> np.ndarray:
  """One training view of `image`: scale augmentation, crop, flip, lighting; uint8 [S, S, 3]."""
  image = open_image(image)
  resized, top, left, flip = train_crop(rng, image.size[1], image.size[0], size,
                                        short_side_range)
  out = resized_crop(image, resized, top, left, size)
  if flip:
    out = out[:, ::-1]
  if lighting_std > 0:
    out = lighting(out, rng, lighting_std)
  return np.ascontiguousarray(out)


# --------------------------------------------------------------------------------- batches


def _positive_int(cfg, field, default):
  value = cfg.get(field, default)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ConfigError(f"config.data.{field}={value!r} is not a positive int: set one")
  return int(value)


def _worker_count(cfg):
  value = cfg.get("num_workers", os.cpu_count() or 1)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ConfigError(f"config.data.num_workers={value!r} is not an int >= 0: set it to the "
                      "worker processes to decode with (0: in the trainer's process)")
  return int(value)


def _check_hosts(batch_size, process_index, process_count):
  if batch_size < 1 or process_count < 1 or batch_size % process_count:
    raise ConfigError(f"batch size {batch_size} does not split over {process_count} hosts: use a "
                      "positive multiple of the host count")
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} is not in [0, {process_count})")
  return batch_size // process_count


class Batches:
  """Makes batches from the records of one split, one image after another.

  What grain's worker processes each hold a copy of: the records (the TFDS source reopens its
  files in a worker) and the augmentation's sizes, nothing that depends on the process.
  """

  def __init__(self, records, *, image_size, train_short_side, eval_short_side, lighting_std):
    self.records = records
    self.num_examples = len(records)
    self.image_size = image_size
    self.train_short_side = train_short_side
    self.eval_short_side = eval_short_side
    self.lighting_std = lighting_std
    self._orders = {}  # (seed, epoch) -> permutation, the last two epochs only

  def __getstate__(self):
    return {**self.__dict__, "_orders": {}}  # A worker draws its own permutations.

  def _read(self, indices: list[int]) -> list:
    read_many = getattr(self.records, "__getitems__", None)  # A TFDS source's batched read.
    if read_many is None or not indices:
      return [self.records[i] for i in indices]
    return list(read_many(indices))

  def order(self, seed: int, epoch: int) -> np.ndarray:
    """The training stream's permutation of the records in `epoch`."""
    order = self._orders.get((seed, epoch))
    if order is None:
      order = np.random.default_rng([seed, _ORDER_STREAM, epoch]).permutation(self.num_examples)
      self._orders = {k: v for k, v in self._orders.items() if k[1] >= epoch - 1}
      self._orders[(seed, epoch)] = order
    return order

  def train_indices(self, seed: int, step: int, batch_size: int, process_index: int = 0,
                    process_count: int = 1) -> np.ndarray:
    """The record indices of this host's part of the global batch of `step`."""
    part = _check_hosts(batch_size, process_index, process_count)
    positions = step * batch_size + process_index * part + np.arange(part, dtype=np.int64)
    epochs, offsets = np.divmod(positions, self.num_examples)
    indices = np.empty(part, np.int64)
    for epoch in np.unique(epochs):
      here = epochs == epoch
      indices[here] = self.order(seed, int(epoch))[offsets[here]]
    return indices

  def train_batch(self, seed, step, batch_size, process_index=0, process_count=1):
    """This host's part of the global batch of `step`: (uint8 [b, S, S, 3], int32 [b])."""
    indices = self.train_indices(seed, step, batch_size, process_index, process_count)
    first = process_index * len(indices)  # Position in the global batch of this host's first.
    records = self._read(indices.tolist())
    images = np.empty((len(indices), self.image_size, self.image_size, 3), np.uint8)
    for j, record in enumerate(records):
      rng = np.random.default_rng([seed, _AUGMENT_STREAM, step, first + j])
      images[j] = train_image(record["image"], rng, size=self.image_size,
                              short_side_range=self.train_short_side,
                              lighting_std=self.lighting_std)
    return images, np.array([int(r["label"]) for r in records], np.int32)

  def eval_batch(self, k, batch_size, process_index=0, process_count=1):
    """This host's part of global eval batch `k`: (uint8 images, int32 labels, bool valid)."""
    part = _check_hosts(batch_size, process_index, process_count)
    positions = k * batch_size + process_index * part + np.arange(part, dtype=np.int64)
    records = self._read(positions[positions < self.num_examples].tolist())
    images = np.zeros((part, self.image_size, self.image_size, 3), np.uint8)
    labels = np.zeros((part,), np.int32)
    valid = np.zeros((part,), bool)
    valid[:len(records)] = True
    for j, record in enumerate(records):
      images[j] = eval_image(record["image"], size=self.image_size,
                             short_side=self.eval_short_side)
      labels[j] = int(record["label"])
    return images, labels, valid


class _TrainStep:
  """step -> that step's batch of one seed and host: the map of a grain MapDataset."""

  def __init__(self, batches, seed, batch_size, process_index, process_count):
    self.batches, self.args = batches, (seed, batch_size, process_index, process_count)

  def __call__(self, step):
    seed, batch_size, process_index, process_count = self.args
    return self.batches.train_batch(seed, int(step), batch_size, process_index, process_count)


class _EvalStep:
  """k -> global eval batch k's part of one host: the map of a grain MapDataset."""

  def __init__(self, batches, batch_size, process_index, process_count):
    self.batches, self.args = batches, (batch_size, process_index, process_count)

  def __call__(self, k):
    return self.batches.eval_batch(int(k), *self.args)


# No run takes this many steps; a training stream is this long so that it never ends.
_ENDLESS = 2 ** 62


def _iterate(make, start: int, stop: int, workers: int, prefetch: bool):
  """Iterates over make(k) for k in [start, stop) in order, through a grain MapDataset.

  With workers, worker w of W makes the k with (k - start) % W == w, each one ahead; the
  iterator takes them in turn. Without, this process makes them, one ahead on a thread if
  `prefetch`.
  """
  import grain  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():  # Called outside an absl program: grain reads its flags' defaults.
    flags.FLAGS.mark_as_parsed()
  dataset = grain.MapDataset.range(start, stop).map(make)
  ahead = 1 if prefetch else 0
  if not workers:
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=ahead,
                                                          prefetch_buffer_size=ahead)))
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
              .mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                        per_worker_buffer_size=1)))


def _owned(batch):
  """The batch in this process's memory: from several workers grain hands over shared memory,
  which is freed as soon as these copies are made."""
  return tuple(np.array(x) for x in batch)


class TrainStream:
  """One seed's training batches (this host's part) from step `start` on, made ahead by grain.

  `state()` is where it stands: its start, its next step and grain's iterator state; a stream
  built with that state goes on from there.
  """

  def __init__(self, batches, seed, batch_size, process_index=0, process_count=1, *, workers=0,
               prefetch=True, start=0, state=None):
    _check_hosts(batch_size, process_index, process_count)
    self.key = (int(seed), int(batch_size), int(process_index), int(process_count))
    self.workers = workers
    self.start = int(state["start"] if state else start)
    self._iterator = _iterate(_TrainStep(batches, *self.key), self.start, _ENDLESS, workers,
                              prefetch)
    self.step = self.start
    if state:
      self._iterator.set_state(state["grain"])
      self.step = int(state["step"])

  def __next__(self):
    batch = _owned(next(self._iterator))
    self.step += 1
    return batch

  def state(self) -> dict:
    seed, batch_size, process_index, process_count = self.key
    return {"seed": seed, "batch_size": batch_size, "process_index": process_index,
            "process_count": process_count, "workers": self.workers, "start": self.start,
            "step": self.step, "grain": self._iterator.get_state()}

  def close(self):
    """Stops its workers and threads; frees the batches they held."""
    self._iterator.close()
    self._iterator = None
    gc.collect()  # Grain's iterators hold reference cycles, and with them shared memory.


# --------------------------------------------------------------------------------- source


class ImageNetSource:
  """One split of imagenet2012, served as uint8 batches of fixed content.

  `cfg` is config.data: data_dir (None: TFDS's default), image_size (224), train_short_side
  ((256, 480) scaled to image_size), eval_short_side (256 scaled), lighting_std (0.1),
  num_workers (grain worker processes for each seed's stream and for each evaluation, which
  start their own; 0: decode in this process; default the CPU count), prefetch (True: with 0
  workers, make the next batch on a thread while the trainer runs a step).
  `records`, if given, stands for the TFDS split: a random-access sequence of
  {"image": encoded bytes or a uint8 array, "label": int} (the loader bench feeds it so).

  The training streams' positions are iterator state (`get_state`, `set_state`), which the
  trainer saves in its checkpoints with grain's orbax handler.
  """

  def __init__(self, cfg, split: str = TRAIN_SPLIT, records=None):
    name = cfg.get("name", DATASET)
    if name != DATASET:
      raise ConfigError(f"ImageNetSource reads {DATASET}, not config.data.name={name!r}")
    self.split = split
    self.image_size = _positive_int(cfg, "image_size", PAPER_IMAGE_SIZE)
    low, high = cfg.get("train_short_side", None) or tuple(
        _scaled(side, self.image_size) for side in PAPER_TRAIN_SHORT_SIDE)
    self.train_short_side = (int(low), int(high))
    self.eval_short_side = int(cfg.get("eval_short_side", None) or
                               _scaled(PAPER_EVAL_SHORT_SIDE, self.image_size))
    if not self.image_size <= low <= high or self.eval_short_side < self.image_size:
      raise ConfigError(
          f"short sides train {self.train_short_side} and eval {self.eval_short_side} must be at "
          f"least image_size={self.image_size}, with train min <= max: fix config.data")
    self.lighting_std = float(cfg.get("lighting_std", DEFAULT_LIGHTING_STD))
    if self.lighting_std < 0:
      raise ConfigError(f"config.data.lighting_std={self.lighting_std} is negative: use >= 0")
    self.num_workers = _worker_count(cfg)
    self.prefetch = bool(cfg.get("prefetch", True))
    if records is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      # The JPEG bytes stay encoded: the workers decode them, at reduced scale when they can.
      records = prepare.open_data_source(DATASET, split, cfg.get("data_dir", None) or None,
                                         decoders={"image": tfds.decode.SkipDecoding()})
    self._batches = Batches(records, image_size=self.image_size,
                            train_short_side=self.train_short_side,
                            eval_short_side=self.eval_short_side, lighting_std=self.lighting_std)
    self.num_examples = self._batches.num_examples
    self.num_classes = NUM_CLASSES
    self.mean, self.std = MEAN_RGB, STD_RGB
    self._lock = threading.Lock()
    self._streams = {}  # (seed, batch_size, process_index, process_count) -> TrainStream

  def close(self):
    """Stops the streams' workers and threads."""
    with self._lock:
      streams, self._streams = list(self._streams.values()), {}
    for stream in streams:
      stream.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # ------------------------------------------------------------------------------- train

  def train_batch(self, seed: int, step: int, batch_size: int, process_index: int = 0,
                  process_count: int = 1):
    """This host's part of the global training batch of `step`: (uint8 [b, S, S, 3], int32 [b]).

    b = batch_size // process_count; the content depends only on the arguments (see the module
    docstring). Called for consecutive steps, the batches come from one grain stream, made
    ahead; another step starts a new stream there.
    """
    _check_hosts(batch_size, process_index, process_count)
    key = (int(seed), int(batch_size), int(process_index), int(process_count))
    with self._lock:
      stream = self._streams.get(key)
      if stream is None or stream.step != step:
        if stream is not None:
          stream.close()
        stream = self._streams[key] = TrainStream(
            self._batches, *key, workers=self.num_workers, prefetch=self.prefetch, start=step)
      return next(stream)

  def train_indices(self, seed: int, step: int, batch_size: int, process_index: int = 0,
                    process_count: int = 1) -> np.ndarray:
    """The record indices of this host's part of the global batch of `step`."""
    return self._batches.train_indices(seed, step, batch_size, process_index, process_count)

  def _order(self, seed, epoch):
    return self._batches.order(seed, epoch)

  # ------------------------------------------------------------------- iterator state

  def get_state(self) -> bytes:
    """Where every training stream stands (JSON): what grain's orbax handler saves."""
    with self._lock:
      streams = [stream.state() for stream in self._streams.values()]
    return json.dumps({"streams": streams}).encode()

  def set_state(self, state: bytes) -> None:
    """Resumes the streams of `get_state`'s output, each at its step.

    A stream saved with another worker count starts afresh at its step: the same batches.
    """
    self.close()
    with self._lock:
      for saved in json.loads(state)["streams"]:
        key = tuple(saved[f] for f in ("seed", "batch_size", "process_index", "process_count"))
        if saved["workers"] == self.num_workers:
          stream = TrainStream(self._batches, *key, workers=self.num_workers,
                               prefetch=self.prefetch, state=saved)
        else:
          stream = TrainStream(self._batches, *key, workers=self.num_workers,
                               prefetch=self.prefetch, start=saved["step"])
        self._streams[key] = stream

  def start_prefetch(self) -> None:
    """Called by grain's orbax handler after `set_state`: the streams are already running."""

  # -------------------------------------------------------------------------------- eval

  def eval_batches(self, batch_size: int, process_index: int = 0, process_count: int = 1):
    """Yields (uint8 [b, S, S, 3], int32 [b], bool valid [b]) over the split, in stored order.

    Global batch k holds records [k B, (k + 1) B), host p its p-th slice, padded with zero
    images where the split ends (valid False). Every host yields ceil(N / B) batches, so
    collectives across hosts stay in step, and the valid entries of all hosts cover every
    record exactly once.
    """
    _check_hosts(batch_size, process_index, process_count)
    count = math.ceil(self.num_examples / batch_size)
    if not count:
      return
    iterator = _iterate(_EvalStep(self._batches, batch_size, process_index, process_count), 0,
                        count, self.num_workers, self.prefetch)
    try:
      for _ in range(count):
        yield _owned(next(iterator))
    finally:
      iterator.close()
      del iterator
      gc.collect()  # As in TrainStream.close.
