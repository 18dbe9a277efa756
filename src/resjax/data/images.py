"""Image classification splits held in memory, and the ResNet-paper augmentation in JAX.

`load_images` returns uint8 arrays; `normalize` and `augment` run on device inside the
jitted step, so the host never holds a float copy of the dataset.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from resjax.errors import ConfigError, DatasetNotPrepared

KNOWN_DATASETS = ("digits", "cifar10", "cifar100")
_TFDS_DATASETS = ("cifar10", "cifar100")

# The digits split is part of resjax's results: never change these numbers.
DIGITS_SEED = 0
DIGITS_NUM_TRAIN = 1497  # Of 1797; the remaining 300 are the test split.

# Records per `__getitems__` call: large enough to amortize the reads, small enough that the
# decoded batch stays a few tens of MB.
_READ_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class ImageSplits:
  """Train and test images of one dataset, as stored (uint8, NHWC)."""
  train_images: np.ndarray  # uint8 [N, H, W, C]
  train_labels: np.ndarray  # int32 [N]
  test_images: np.ndarray  # uint8 [M, H, W, C]
  test_labels: np.ndarray  # int32 [M]
  num_classes: int
  mean: np.ndarray  # float32 [H, W, C], per-pixel mean of the train images in [0, 1] units


def load_images(cfg) -> ImageSplits:
  """Loads the dataset named by `cfg.name` (see module constants) into memory."""
  name = cfg.get("name", "digits")
  data_dir = cfg.get("data_dir", None) or None
  train_size = _check_size("train_size", cfg.get("train_size", None))
  test_size = _check_size("test_size", cfg.get("test_size", None))
  if name == "digits":
    train_x, train_y, test_x, test_y = _load_digits()
    num_classes = 10
    train_x, train_y = _first(name, "train", train_x, train_y, train_size)
    test_x, test_y = _first(name, "test", test_x, test_y, test_size)
  elif name in _TFDS_DATASETS:
    train_x, train_y, test_x, test_y, num_classes = _load_tfds(
        name, data_dir, train_size, test_size)
  else:
    raise ConfigError(f'unknown config.data.name={name!r}: use one of {", ".join(KNOWN_DATASETS)}')
  # Accumulate in float64 (numpy casts chunk by chunk, no full float copy): a float32 sum of
  # 50k values of ~100 loses digits.
  mean = (train_x.mean(axis=0, dtype=np.float64) / 255.0).astype(np.float32)
  return ImageSplits(train_x, train_y, test_x, test_y, int(num_classes), mean)


def normalize(images, mean) -> jax.Array:
  """Maps uint8 images to float32 `images / 255 - mean`; jit-able."""
  return jnp.asarray(images, jnp.float32) / 255.0 - jnp.asarray(mean, jnp.float32)


def augment(key: jax.Array, images: jax.Array, *, pad: int, flip: bool) -> jax.Array:
  """Random crop after zero padding, and random horizontal flip, per example.

  The ResNet-paper recipe: on normalized images [B, H, W, C], pad `pad` zeros on each side,
  crop an HxW window at an independent uniform offset per example, and mirror each example
  left-right with probability 1/2 when `flip`. As in the paper, padding comes after mean
  subtraction, so pads are zeros in normalized space. `pad` and `flip` are static (Python
  values), so bind them before `jax.jit`.
  """
  if pad < 0:
    raise ConfigError(f"config.data.pad={pad} is negative: use 0 (no crops) or a positive int")
  if pad == 0 and not flip:
    return images
  batch, height, width, channels = images.shape
  crop_key, flip_key = jax.random.split(key)
  if pad:
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * pad + 1)

    def crop(image, offset):
      return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    images = jax.vmap(crop)(padded, offsets)
  if flip:
    mirror = jax.random.bernoulli(flip_key, 0.5, (batch,))
    images = jnp.where(mirror[:, None, None, None], images[:, :, ::-1, :], images)
  return images


def _check_size(field, value):
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ConfigError(f"config.data.{field}={value!r} is not a positive int: set a count or None")
  return int(value)


def _check_fits(name, split, size, total):
  """A size beyond the split would silently train on less than asked: a config mistake."""
  if size is not None and size > total:
    raise ConfigError(f"config.data.{split}_size={size} exceeds the {total} {split} examples "
                      f"of {name}: lower it or set it to None")


def _first(name, split, images, labels, size):
  """Keeps the first `size` examples (all if None)."""
  _check_fits(name, split, size, len(labels))
  return (images, labels) if size is None else (images[:size], labels[:size])


def _load_digits():
  """scikit-learn's bundled 8x8 digits with resjax's fixed split.

  The 1797 images (values 0..16) become uint8 [N, 8, 8, 1] via round(v * 255 / 16). The
  split is `np.random.default_rng(0).permutation(1797)`: its first 1497 indices are train,
  its last 300 test. Nothing is downloaded.
  """
  from sklearn.datasets import load_digits  # Lazy: the CIFAR path does not need it.
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(DIGITS_SEED).permutation(len(labels))
  train, test = order[:DIGITS_NUM_TRAIN], order[DIGITS_NUM_TRAIN:]
  return images[train], labels[train], images[test], labels[test]


def not_prepared_message(name, data_dir) -> str:
  """The one line telling the user how to prepare `name` in `data_dir`."""
  return (f"{name} is not prepared in {data_dir}: run 'python -m resjax.data.prepare "
          f"--dataset {name} --data_dir {data_dir}' (needs: pip install 'resjax[prepare]')")


def _load_tfds(name, data_dir, train_size, test_size):
  """Reads a prepared TFDS dataset by random access (ArrayRecord), without TensorFlow."""
  import tensorflow_datasets as tfds  # Lazy: ~1 s of imports that digits runs skip.
  try:
    # download=False: never build or fetch here; preparing is an explicit, separate step.
    sources = tfds.data_source(name, split=["train", "test"], data_dir=data_dir, download=False)
  except (NotImplementedError, KeyError):
    # TFDS reports a missing dataset as "file format tfrecord has no random access" (an
    # unprepared builder defaults to tfrecord) or, in its default data dir, as a KeyError for an
    # empty split list; tell these apart from a dataset prepared without random access.
    builder = tfds.builder(name, data_dir=data_dir)
    root = os.fspath(builder.data_dir_root)
    if not builder.is_prepared():
      raise DatasetNotPrepared(not_prepared_message(name, root),
                               offline="set config.data.name=digits") from None
    formats = builder.info.available_file_formats()
    if formats & set(tfds.core.FileFormat.with_random_access()):
      raise  # Readable files are there, so the error is not about preparation.
    raise DatasetNotPrepared(
        f"{name} in {root} was prepared as {sorted(f.value for f in formats)}, without random "
        f"access: run 'python -m resjax.data.prepare --dataset {name} --data_dir NEW_DIR' with "
        "a new directory (it writes array_record)") from None
  train, test = sources
  num_classes = train.dataset_info.features["label"].num_classes
  train_x, train_y = _read_all(name, "train", train, train_size)
  test_x, test_y = _read_all(name, "test", test, test_size)
  return train_x, train_y, test_x, test_y, num_classes


def _read_all(name, split, source, size):
  """Decodes the first `size` records (all if None) into uint8 images and int32 labels."""
  _check_fits(name, split, size, len(source))
  count = len(source) if size is None else size
  images = np.empty((count, *source.dataset_info.features["image"].shape), np.uint8)
  labels = np.empty((count,), np.int32)
  for start in range(0, count, _READ_CHUNK):
    keys = list(range(start, min(count, start + _READ_CHUNK)))
    for i, example in zip(keys, source.__getitems__(keys)):
      images[i] = example["image"]
      labels[i] = example["label"]
  return images, labels
