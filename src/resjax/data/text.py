"""Byte-level language-model data: token splits held in memory, and windows cut on device.

Tokens are bytes (vocabulary 256), so no tokenizer or vocabulary file is ever downloaded.
`load_text` returns the train and test splits as 1-D uint8 arrays; the trainer puts them on
device once and cuts batches there with `gather_windows` from starts that `window_starts`
derives from (seed, step) alone, so a resumed run sees exactly the batches it would have seen.

Corpora (`config.data.name`):
- 'stdlib' (default, offline): the running Python's standard library source. Every `.py` file
  under `sysconfig.get_paths()['stdlib']`, skipping `site-packages`, `dist-packages` and
  `__pycache__` folders, read as raw bytes in the order of their sorted relative paths ('/'
  separated). The split is by file: a file is in test when the first 8 bytes of the sha256 of
  its relative path, read as a big-endian integer, are 0 mod 10 (about 10% of files), so no
  file is in both splits and the split of a file never depends on which other files exist.
  Within a split, files are joined with the SEPARATOR byte. The corpus is whatever standard
  library runs resjax, so its size and content change with the Python version; compare numbers
  across runs only on the same version (`TextSplits.description` names it). On Python 3.11.7
  (the machine resjax was written on) it is 1790 files and 31.5 MB: 1617 train files (28.5 MB)
  and 173 test files (3.0 MB, 9.6% of the bytes).
- 'tiny_shakespeare' (TFDS; one example per split) and 'lm1b' (TFDS; one sentence per
  example): read by random access through `tfds.data_source` (ArrayRecord files, no
  TensorFlow), the 'text' feature encoded as UTF-8, examples in stored order joined with the
  SEPARATOR byte. The test split is TFDS's 'test'. A set that is not prepared raises
  `DatasetNotPrepared` naming the `python -m resjax.data.prepare` command.

`config.data.max_train_bytes` and `max_test_bytes` (None = all) cap each split: reading stops
once the cap is reached and the split is cut to exactly that many bytes. Windows are indexed
with int32 (JAX's default), so a split holds at most MAX_TOKENS = 2**31 - 1 bytes; lm1b's train
split is larger (about 4 GB of text), so it needs max_train_bytes.
"""

import dataclasses
import hashlib
import os
import platform
import sysconfig

import jax.numpy as jnp
import numpy as np

from resjax.data import prepare
from resjax.errors import ConfigError

KNOWN_CORPORA = ("stdlib", "tiny_shakespeare", "lm1b")
_TFDS_CORPORA = ("tiny_shakespeare", "lm1b")

VOCAB_SIZE = 256
# Joins files or examples. NUL never occurs in the text of these corpora, so a model can tell a
# document boundary from any character.
SEPARATOR = 0
MAX_TOKENS = 2**31 - 1  # Offsets into a split are int32.

# The stdlib split is part of resjax's results: never change these.
STDLIB_TEST_MODULUS = 10  # A file is test when hash(relative path) % 10 == 0.
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})

# Records per `__getitems__` call when reading a TFDS split.
_READ_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class TextSplits:
  """Train and test token streams of one corpus (bytes as uint8)."""
  name: str
  train: np.ndarray  # uint8 [num_train_tokens]
  test: np.ndarray  # uint8 [num_test_tokens]
  vocab_size: int = VOCAB_SIZE
  description: str = ""


def load_text(cfg) -> TextSplits:
  """Loads the corpus named by `cfg.name` (see the module docstring) into memory."""
  name = cfg.get("name", "stdlib")
  data_dir = cfg.get("data_dir", None) or None
  max_train = _check_cap("max_train_bytes", cfg.get("max_train_bytes", None))
  max_test = _check_cap("max_test_bytes", cfg.get("max_test_bytes", None))
  if name == "stdlib":
    train, test, description = _load_stdlib()
    train, test = train[:max_train], test[:max_test]
  elif name in _TFDS_CORPORA:
    train_source, test_source = prepare.open_data_source(
        name, ["train", "test"], data_dir, offline_name="stdlib")
    train = _read_text(name, "train", train_source, max_train)
    test = _read_text(name, "test", test_source, max_test)
    description = f"TFDS {name} (train and test splits as UTF-8 bytes)"
  else:
    raise ConfigError(f'unknown config.data.name={name!r}: use one of {", ".join(KNOWN_CORPORA)}')
  for split, tokens in (("train", train), ("test", test)):
    if not tokens.size:
      raise ConfigError(f"the {split} split of {name} is empty: use a corpus with text in both")
  description += f"; {train.size:,} train and {test.size:,} test bytes"
  return TextSplits(name, train, test, VOCAB_SIZE, description)


def _check_cap(field, value):
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ConfigError(f"config.data.{field}={value!r} is not a positive int: set a count or None")
  return int(value)


# ---------------------------------------------------------------------------------- stdlib


def stdlib_root() -> str:
  """The folder of the running Python's standard library."""
  return sysconfig.get_paths()["stdlib"]


def stdlib_files() -> list[str]:
  """Sorted '/'-separated paths, relative to `stdlib_root()`, of the corpus's `.py` files."""
  root = stdlib_root()
  paths = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS]
    relative = os.path.relpath(folder, root)
    for file in files:
      if file.endswith(".py"):
        path = file if relative == os.curdir else os.path.join(relative, file)
        paths.append(path.replace(os.sep, "/"))
  return sorted(paths)


def is_test_file(relative_path: str) -> bool:
  """Whether a stdlib file belongs to the test split; depends on its path alone."""
  digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % STDLIB_TEST_MODULUS == 0


def _load_stdlib():
  root = stdlib_root()
  files = stdlib_files()
  if not files:
    raise ConfigError(f"found no .py files under {root}: this Python ships no standard library "
                      "source; set config.data.name=tiny_shakespeare or lm1b")
  parts = {False: [], True: []}
  for path in files:
    with open(os.path.join(root, path), "rb") as f:
      parts[is_test_file(path)].append(f.read())
  train, test = (_join(parts[split]) for split in (False, True))
  description = (f"Python {platform.python_version()} standard library .py files "
                 f"({len(parts[False])} train, {len(parts[True])} test) from {root}")
  return train, test, description


def _join(chunks) -> np.ndarray:
  return np.frombuffer(bytes([SEPARATOR]).join(chunks), np.uint8).copy()


# ------------------------------------------------------------------------------------ TFDS


def _as_bytes(text) -> bytes:
  """The UTF-8 bytes of a decoded Text feature (bytes from ArrayRecord, str or a 0-d array)."""
  if isinstance(text, np.ndarray):
    text = text.item()
  return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def _read_text(name, split, source, cap) -> np.ndarray:
  """Joins the 'text' of the records of `source` in order, stopping at `cap` bytes."""
  out = bytearray()
  for start in range(0, len(source), _READ_CHUNK):
    keys = list(range(start, min(len(source), start + _READ_CHUNK)))
    for example in source.__getitems__(keys):
      if out:
        out.append(SEPARATOR)
      out += _as_bytes(example["text"])
      if cap is not None and len(out) >= cap:
        return np.frombuffer(out[:cap], np.uint8)
      if len(out) > MAX_TOKENS:
        # Fail while reading rather than after gigabytes more.
        raise ConfigError(f"the {split} split of {name} exceeds {MAX_TOKENS} bytes (offsets are "
                          f"int32): set config.data.max_{split}_bytes to at most that")
  return np.frombuffer(out, np.uint8)


# ---------------------------------------------------------------------------------- batches


def window_starts(seed: int, step: int, num_tokens: int, batch_size: int,
                  context: int) -> np.ndarray:
  """Start offsets int32 [batch_size] of the training windows of `step`.

  Uniform over every offset whose window of `context + 1` tokens (inputs and the next-token
  targets) fits in the split, drawn from a generator seeded by (seed, step) alone: the same
  step gives the same batch whether a run got there directly or after a resume.
  """
  if num_tokens < context + 1:
    raise ConfigError(f"the train split has {num_tokens} tokens, fewer than context + 1 = "
                      f"{context + 1}: lower config.model.context or use a larger corpus")
  rng = np.random.default_rng([seed, step])
  return rng.integers(0, num_tokens - context, size=batch_size).astype(np.int32)


def gather_windows(tokens, starts, context: int):
  """Cuts inputs and targets int32 [B, context] from `tokens` at `starts`; jit-able.

  `tokens` is the split on device (uint8); `context` must be static under jit. Targets are the
  inputs shifted by one: targets[b, t] = tokens[starts[b] + t + 1].
  """
  offsets = jnp.arange(context + 1, dtype=jnp.int32)
  return split_windows(jnp.asarray(tokens)[jnp.asarray(starts, jnp.int32)[:, None]
                                           + offsets[None, :]])


def split_windows(windows):
  """Windows [B, T + 1] of token ids -> inputs and next-token targets, int32 [B, T] each."""
  windows = jnp.asarray(windows).astype(jnp.int32)
  return windows[:, :-1], windows[:, 1:]


def eval_starts(num_tokens: int, context: int, max_windows: int | None = None) -> np.ndarray:
  """Starts int32 of non-overlapping evaluation windows over a split.

  Window k starts at k * context, so the targets of all windows together are tokens 1 .. K *
  context, each predicted once; the last `(num_tokens - 1) % context` tokens, too few for a
  window, are left out. With `max_windows` below K, that many windows evenly spread over the
  split are kept.
  """
  count = (num_tokens - 1) // context
  if count < 1:
    raise ConfigError(f"the test split has {num_tokens} tokens, fewer than context + 1 = "
                      f"{context + 1}: lower config.model.context or use a larger corpus")
  if max_windows is None or max_windows >= count:
    index = np.arange(count)
  else:
    if max_windows < 1:
      raise ConfigError(f"max_windows={max_windows} must be positive (or None for all windows)")
    index = np.round(np.linspace(0, count - 1, max_windows)).astype(np.int64)
  return (index * context).astype(np.int32)
