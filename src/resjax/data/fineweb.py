"""FineWeb as GPT-2 tokens, in the shards the modded-nanogpt speedrun record trains on.

A shard is a header of 256 little-endian int32 (magic 20240520, format version 1, the number of
tokens N) followed by exactly N little-endian uint16 tokens, GPT-2 BPE ids below 50257. A folder
holds the splits as `fineweb_train_*.bin` and `fineweb_val_*.bin`, each read in sorted name order;
modded-nanogpt's `python data/cached_fineweb10B.py N` writes them to its data/fineweb10B (the val
shard and train shards 000001 to N-1; see the README's Data section). Shards are memory-mapped
read-only, so no split is ever held in memory.

The streams are the record's:
- train: step s takes the next batch_size * context + 1 tokens of the current shard, rows of
  context + 1 tokens that overlap by one (targets are the inputs shifted by one), and the next
  step starts batch_size * context tokens later. When a step would run past the shard's end the
  stream moves on to the next shard, at its first token, and after the last shard to the first
  again; a shard's tail shorter than a batch is never read. `TrainStream` finds the step's shard
  and offset from the step alone, so a resumed run and every seed of a row see the same batches.
- val: windows of context + 1 tokens starting at k * context, k = 0 .. val_tokens // context - 1,
  over the val shards read as one stream; their targets are tokens 1 .. K * context, each once.
  The record evaluates the first 10,485,760 tokens (VAL_TOKENS), which lie in its one val shard.
"""

from __future__ import annotations

import fnmatch
import os

import numpy as np

from resjax import fileio
from resjax.errors import ConfigError, DatasetNotPrepared, UserError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN = np.dtype("<u2")
GPT2_VOCAB = 50257
VOCAB_SIZE = 50304  # GPT-2's vocabulary padded to a multiple of 128, as the record pads it
VAL_TOKENS = 10_485_760  # the record's val_tokens: 10240 windows of 1024
SPLITS = ("train", "val")

# The record trains 3200 steps of 8 x 64 rows of 1024 tokens (1.68B tokens). A shard of 100M tokens
# gives (10**8 - 1) // 524288 = 190 such steps, so it needs 17 train shards; the script's argument
# 18 fetches the val shard and train shards 000001 to 000017.
RECORD_CHUNKS = 18
DOWNLOAD = f"python data/cached_fineweb10B.py {RECORD_CHUNKS}"
HOW_TO_GET = (f"run `{DOWNLOAD}` in a clone of github.com/KellerJordan/modded-nanogpt and set "
              "config.data.data_dir to its data/fineweb10B")
# The download script skips a shard that exists, so a bad one is deleted first.
REDOWNLOAD = f"delete it and run `{DOWNLOAD}` again"


# ------------------------------------------------------------------------------------ shards


def read_header(path: str) -> int:
  """The number of tokens of the shard at `path`, after checking its header against its size."""
  with open(path, "rb") as f:
    header = f.read(HEADER_BYTES)
  if len(header) < HEADER_BYTES:
    raise UserError(f"{path} is {len(header)} bytes, shorter than the {HEADER_BYTES}-byte header "
                    f"of a FineWeb token shard: the file is cut short; {REDOWNLOAD}")
  magic, version, count = (int(x) for x in np.frombuffer(header, "<i4")[:3])
  if magic != MAGIC:
    raise UserError(f"{path} starts with magic {magic}, not {MAGIC}: it is not a FineWeb GPT-2 "
                    f"token shard; move it out of the folder, or {REDOWNLOAD}")
  if version != VERSION:
    raise UserError(f"{path} is shard format version {version}; resjax reads version {VERSION} "
                    f"(uint16 tokens): {REDOWNLOAD}")
  body = os.path.getsize(path) - HEADER_BYTES
  if count < 0 or body != count * TOKEN.itemsize:
    raise UserError(f"{path} declares {count:,} tokens in its header but holds {body:,} bytes of "
                    f"tokens, not {max(count, 0) * TOKEN.itemsize:,}: the file is truncated or "
                    f"corrupt; {REDOWNLOAD}")
  return count


def read_shard(path: str) -> np.ndarray:
  """The tokens of one shard: uint16 [N], memory-mapped read-only (a view, nothing is loaded)."""
  count = read_header(path)
  if count == 0:  # mmap cannot map zero bytes
    return np.zeros(0, TOKEN)
  return np.memmap(path, dtype=TOKEN, mode="r", offset=HEADER_BYTES, shape=(count,))


def check_data_dir(data_dir) -> str:
  """`config.data.data_dir` as a local folder path, or the one-line error that says what to set."""
  if not data_dir:
    raise ConfigError(f"config.data.data_dir is {data_dir!r}: fineweb needs the folder of its "
                      f"token shards; {HOW_TO_GET} (--config.data.data_dir=PATH)")
  if fileio.is_remote(data_dir):
    raise ConfigError(f"config.data.data_dir={data_dir} is remote, and FineWeb shards are "
                      "memory-mapped: copy the folder to a local disk and point data_dir there")
  return os.path.abspath(os.path.expanduser(str(data_dir)))


def shard_paths(data_dir: str, split: str) -> list[str]:
  """The sorted paths of `fineweb_{split}_*.bin` in `data_dir`."""
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is not one of {SPLITS}")
  if not os.path.isdir(data_dir):
    why = "is not a folder" if os.path.exists(data_dir) else "does not exist"
    raise DatasetNotPrepared(f"{data_dir} {why}, so it holds no FineWeb shards: {HOW_TO_GET}")
  pattern = f"fineweb_{split}_*.bin"
  names = sorted(n for n in os.listdir(data_dir) if fnmatch.fnmatchcase(n, pattern))
  if not names:
    raise DatasetNotPrepared(f"{data_dir} holds no {pattern} shards: {HOW_TO_GET}")
  return [os.path.join(data_dir, n) for n in names]


class Shards:
  """The shards of one split of a folder: every header checked now, tokens mapped when read."""

  def __init__(self, data_dir: str, split: str):
    self.split = split
    self.paths = shard_paths(data_dir, split)
    self.sizes = np.array([read_header(p) for p in self.paths], np.int64)
    self.starts = np.concatenate([[0], np.cumsum(self.sizes)])  # of each shard in the split
    self.num_tokens = int(self.starts[-1])
    self._mapped: dict[int, np.ndarray] = {}

  def tokens(self, i: int) -> np.ndarray:
    if i not in self._mapped:
      self._mapped[i] = read_shard(self.paths[i])
    return self._mapped[i]

  def read(self, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of the split's shards read as one stream (uint16, a copy)."""
    if not 0 <= start <= stop <= self.num_tokens:
      raise ValueError(f"tokens [{start}, {stop}) are outside the {self.num_tokens} of the split")
    parts = []
    first = int(np.searchsorted(self.starts, start, side="right")) - 1
    for i in range(max(first, 0), len(self.paths)):
      lo, hi = max(start, self.starts[i]), min(stop, self.starts[i + 1])
      if lo >= stop:
        break
      if lo < hi:
        parts.append(self.tokens(i)[lo - self.starts[i]:hi - self.starts[i]])
    return np.concatenate(parts) if parts else np.zeros(0, TOKEN)


def _rows(flat: np.ndarray, rows: int, context: int) -> np.ndarray:
  """`rows` windows of context + 1 tokens of `flat`, row r from token r * context (uint16)."""
  view = np.lib.stride_tricks.sliding_window_view(flat, context + 1)[::context][:rows]
  return np.array(view, TOKEN)


# ------------------------------------------------------------------------------------ streams


class TrainStream:
  """The record's train stream at one batch size: step -> its batch of windows."""

  def __init__(self, shards: Shards, batch_size: int, context: int):
    self.shards, self.rows, self.context = shards, int(batch_size), int(context)
    self.batch_tokens = self.rows * self.context
    # A shard serves the steps whose batch (batch_tokens + 1 tokens) fits from its offset.
    steps = (shards.sizes - 1) // self.batch_tokens
    for path, size, n in zip(shards.paths, shards.sizes, steps):
      if n < 1:
        raise ConfigError(f"{path} holds {size:,} tokens, fewer than one batch of "
                          f"config.batch_size x config.model.context + 1 = "
                          f"{self.batch_tokens + 1:,}: lower the batch or the context, or move "
                          "the shard out of the folder")
    self.steps_per_shard = steps
    self.first_step = np.concatenate([[0], np.cumsum(steps)])
    self.steps_per_pass = int(self.first_step[-1])
    self._last: tuple[int, np.ndarray] | None = None

  def position(self, step: int) -> tuple[int, int]:
    """(shard index, token offset in it) where `step`'s batch starts."""
    if step < 0:
      raise ValueError(f"step {step} is negative")
    s = step % self.steps_per_pass
    shard = int(np.searchsorted(self.first_step, s, side="right")) - 1
    return shard, int(s - self.first_step[shard]) * self.batch_tokens

  def batch(self, step: int) -> np.ndarray:
    """Step `step`'s windows, uint16 [batch_size, context + 1]: inputs [:, :-1], targets [:, 1:]."""
    if self._last is not None and self._last[0] == step:  # the seeds of a row ask in turn
      return self._last[1]
    shard, offset = self.position(step)
    flat = self.shards.tokens(shard)[offset:offset + self.batch_tokens + 1]
    out = _rows(flat, self.rows, self.context)
    out.flags.writeable = False  # handed out again for the next seed
    self._last = (step, out)
    return out


def check_val_tokens(value) -> int:
  """`config.data.val_tokens` (None: the record's VAL_TOKENS) as a positive int."""
  if value is None:
    return VAL_TOKENS
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ConfigError(f"config.data.val_tokens={value!r} is not a positive int: set a count of "
                      f"tokens (the record's is {VAL_TOKENS:,}) or None")
  return int(value)


class ValWindows:
  """The record's evaluation: val_tokens // context consecutive windows of the val stream."""

  def __init__(self, shards: Shards, context: int, val_tokens: int):
    self.shards, self.context = shards, int(context)
    self.count = val_tokens // self.context
    if self.count < 1:
      raise ConfigError(f"config.data.val_tokens={val_tokens:,} is fewer than one window of "
                        f"config.model.context={self.context}: raise val_tokens")
    need = self.count * self.context + 1
    if shards.num_tokens < need:
      folder = os.path.dirname(shards.paths[0])
      raise ConfigError(f"the fineweb_val_*.bin shards in {folder} hold {shards.num_tokens:,} "
                        f"tokens, fewer than the {need:,} that {self.count:,} windows of "
                        f"{self.context} need: lower config.data.val_tokens")

  def windows(self, index) -> np.ndarray:
    """Windows `index` (ints in [0, count)), uint16 [len(index), context + 1]."""
    index = np.asarray(index, np.int64)
    if index.size == 0:
      return np.zeros((0, self.context + 1), TOKEN)
    lo, hi = int(index.min()), int(index.max()) + 1
    if lo < 0 or hi > self.count:
      raise ValueError(f"windows {lo}..{hi - 1} are outside 0..{self.count - 1}")
    span = self.shards.read(lo * self.context, hi * self.context + 1)
    return _rows(span, hi - lo, self.context)[index - lo]
