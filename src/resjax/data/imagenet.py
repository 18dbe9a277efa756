"""ImageNet (ILSVRC2012) through TFDS imagenet2012, decoded and augmented on host threads.

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
their JPEG bytes left encoded (`tfds.data_source`, no TensorFlow) and decoded on a pool of
`config.data.num_workers` threads (Pillow releases the GIL); while the trainer runs a step,
the next batch is prepared in the background.

Every batch is a fixed function of its arguments, never of history or thread timing: the
training stream visits the examples in a permutation drawn from (seed, epoch), step k takes
positions [k B, (k + 1) B) of that stream (B the global batch), host p of P takes the p-th of P
equal slices, and the augmentation of the example at position i of the global batch draws from
a generator seeded by (seed, step, i). So a resumed run sees the same batches, and P hosts
together see exactly the batch one host would.

Images leave the host as uint8; `normalize` maps them to float on device with the per-channel
MEAN_RGB and STD_RGB.
"""

import concurrent.futures
import io
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


# --------------------------------------------------------------------------------- source


def _positive_int(cfg, field, default):
  value = cfg.get(field, default)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ConfigError(f"config.data.{field}={value!r} is not a positive int: set one")
  return int(value)


def _check_hosts(batch_size, process_index, process_count):
  if batch_size < 1 or process_count < 1 or batch_size % process_count:
    raise ConfigError(f"batch size {batch_size} does not split over {process_count} hosts: use a "
                      "positive multiple of the host count")
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} is not in [0, {process_count})")
  return batch_size // process_count


class ImageNetSource:
  """One split of imagenet2012, served as uint8 batches of fixed content.

  `cfg` is config.data: data_dir (None: TFDS's default), image_size (224), train_short_side
  ((256, 480) scaled to image_size), eval_short_side (256 scaled), lighting_std (0.1),
  num_workers (decoding threads; the CPU count), prefetch (True).
  """

  def __init__(self, cfg, split: str = TRAIN_SPLIT):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
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
    self.num_workers = _positive_int(cfg, "num_workers", os.cpu_count() or 1)
    self.prefetch = bool(cfg.get("prefetch", True))
    # The JPEG bytes stay encoded: decoding happens on the pool, at reduced scale when it can.
    self._source = prepare.open_data_source(
        DATASET, split, cfg.get("data_dir", None) or None,
        decoders={"image": tfds.decode.SkipDecoding()})
    self.num_examples = len(self._source)
    self.num_classes = NUM_CLASSES
    self.mean, self.std = MEAN_RGB, STD_RGB
    self._pool = concurrent.futures.ThreadPoolExecutor(self.num_workers, "resjax-decode")
    self._background = concurrent.futures.ThreadPoolExecutor(1, "resjax-prefetch")
    self._lock = threading.Lock()
    self._orders = {}  # epoch -> permutation, the last two epochs only
    self._pending = None  # (train_batch args, future) of the prefetched batch

  def close(self):
    """Stops the threads; the source is unusable afterwards."""
    self._background.shutdown(wait=True, cancel_futures=True)
    self._pool.shutdown(wait=True, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # ------------------------------------------------------------------------------- train

  def train_batch(self, seed: int, step: int, batch_size: int, process_index: int = 0,
                  process_count: int = 1):
    """This host's part of the global training batch of `step`: (uint8 [b, S, S, 3], int32 [b]).

    b = batch_size // process_count; the content depends only on the arguments (see the module
    docstring). With prefetch on, the call for step + 1 with the same other arguments is
    prepared in the background.
    """
    args = (seed, step, batch_size, process_index, process_count)
    _check_hosts(batch_size, process_index, process_count)
    with self._lock:
      pending, self._pending = self._pending, None
    if pending is not None and pending[0] == args:
      batch = pending[1].result()
    else:
      if pending is not None:
        pending[1].cancel()
      batch = self._make_train_batch(*args)
    if self.prefetch:
      following = (seed, step + 1, batch_size, process_index, process_count)
      future = self._background.submit(self._make_train_batch, *following)
      with self._lock:
        self._pending = (following, future)
    return batch

  def _order(self, seed, epoch):
    with self._lock:
      order = self._orders.get((seed, epoch))
    if order is None:
      rng = np.random.default_rng([seed, _ORDER_STREAM, epoch])
      order = rng.permutation(self.num_examples)
      with self._lock:
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
      indices[here] = self._order(seed, int(epoch))[offsets[here]]
    return indices

  def _make_train_batch(self, seed, step, batch_size, process_index, process_count):
    indices = self.train_indices(seed, step, batch_size, process_index, process_count)
    first = process_index * len(indices)  # Position in the global batch of this host's first.
    records = self._source.__getitems__(indices.tolist())
    images = np.empty((len(indices), self.image_size, self.image_size, 3), np.uint8)
    labels = np.array([int(r["label"]) for r in records], np.int32)

    def work(j):
      rng = np.random.default_rng([seed, _AUGMENT_STREAM, step, first + j])
      images[j] = train_image(records[j]["image"], rng, size=self.image_size,
                              short_side_range=self.train_short_side,
                              lighting_std=self.lighting_std)

    list(self._pool.map(work, range(len(indices))))
    return images, labels

  # -------------------------------------------------------------------------------- eval

  def eval_batches(self, batch_size: int, process_index: int = 0, process_count: int = 1):
    """Yields (uint8 [b, S, S, 3], int32 [b], bool valid [b]) over the split, in stored order.

    Global batch k holds records [k B, (k + 1) B), host p its p-th slice, padded with zero
    images where the split ends (valid False). Every host yields ceil(N / B) batches, so
    collectives across hosts stay in step, and the valid entries of all hosts cover every
    record exactly once.
    """
    part = _check_hosts(batch_size, process_index, process_count)
    count = math.ceil(self.num_examples / batch_size)

    def make(k):
      positions = k * batch_size + process_index * part + np.arange(part, dtype=np.int64)
      return self._make_eval_batch(positions[positions < self.num_examples], part)

    following = self._background.submit(make, 0) if self.prefetch and count else None
    for k in range(count):
      batch = following.result() if following is not None else make(k)
      following = self._background.submit(make, k + 1) if self.prefetch and k + 1 < count else None
      yield batch

  def _make_eval_batch(self, indices, part):
    images = np.zeros((part, self.image_size, self.image_size, 3), np.uint8)
    labels = np.zeros((part,), np.int32)
    valid = np.zeros((part,), bool)
    valid[:len(indices)] = True
    records = self._source.__getitems__(indices.tolist()) if len(indices) else []
    labels[:len(records)] = [int(r["label"]) for r in records]

    def work(j):
      images[j] = eval_image(records[j]["image"], size=self.image_size,
                             short_side=self.eval_short_side)

    list(self._pool.map(work, range(len(records))))
    return images, labels, valid
