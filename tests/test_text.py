"""Tests for resjax.data.text: the stdlib corpus and its split, TFDS text sets, and windows."""

import functools
import hashlib
import os
import time

import jax
import ml_collections
import numpy as np
import pytest

from conftest import mocked_tfds
from resjax.data import text
from resjax.errors import ConfigError, DatasetNotPrepared


def _cfg(**fields):
  return ml_collections.ConfigDict(fields)


# ---------------------------------------------------------------------------------- stdlib


@pytest.fixture(scope="module")
def stdlib():
  return text.load_text(_cfg(name="stdlib"))


def test_stdlib_split_is_by_file_and_each_split_is_its_files_joined(stdlib):
  files = text.stdlib_files()
  assert files == sorted(files) and len(files) == len(set(files))
  assert not any(part in {"site-packages", "dist-packages"} for f in files for part in f.split("/"))
  test_files = [f for f in files if text.is_test_file(f)]
  train_files = [f for f in files if not text.is_test_file(f)]
  assert not set(test_files) & set(train_files) and len(test_files) + len(train_files) == len(files)
  assert 0.05 < len(test_files) / len(files) < 0.15  # About 1 in 10 files.
  root = text.stdlib_root()

  def joined(paths):
    chunks = []
    for path in paths:
      with open(os.path.join(root, path), "rb") as f:
        chunks.append(f.read())
    return np.frombuffer(b"\0".join(chunks), np.uint8)

  # Each split holds exactly its own files, whole, in sorted order, separated by one NUL byte.
  np.testing.assert_array_equal(stdlib.test, joined(test_files))
  np.testing.assert_array_equal(stdlib.train, joined(train_files))


def test_stdlib_split_rule_is_pinned():
  # Part of published numbers: these paths' sides must never change (any Python version).
  for path in ("_pydecimal.py", "asyncio/locks.py", "cProfile.py"):
    assert text.is_test_file(path)
  for path in ("os.py", "json/decoder.py", "asyncio/events.py", "abc.py"):
    assert not text.is_test_file(path)
  # The rule by hand: the first 8 bytes of sha256(path), big-endian, are 0 mod 10.
  for path in ("os.py", "cProfile.py", "email/utils.py"):
    value = int(hashlib.sha256(path.encode()).hexdigest()[:16], 16)
    assert text.is_test_file(path) == (value % 10 == 0)


def test_stdlib_is_deterministic_and_sized(stdlib):
  again = text.load_text(_cfg(name="stdlib"))
  np.testing.assert_array_equal(again.train, stdlib.train)
  np.testing.assert_array_equal(again.test, stdlib.test)
  assert stdlib.train.dtype == np.uint8 and stdlib.train.ndim == 1 and stdlib.vocab_size == 256
  assert stdlib.train.size > 1_000_000 and stdlib.test.size > 100_000
  share = stdlib.test.size / (stdlib.train.size + stdlib.test.size)
  assert 0.05 < share < 0.20
  assert "standard library" in stdlib.description and "Python" in stdlib.description


def test_caps_keep_the_first_bytes(stdlib):
  small = text.load_text(_cfg(name="stdlib", max_train_bytes=1000, max_test_bytes=333))
  np.testing.assert_array_equal(small.train, stdlib.train[:1000])
  np.testing.assert_array_equal(small.test, stdlib.test[:333])
  with pytest.raises(ConfigError, match="max_train_bytes=0"):
    text.load_text(_cfg(name="stdlib", max_train_bytes=0))
  with pytest.raises(ConfigError) as e:
    text.load_text(_cfg(name="wikitext"))
  assert all(name in str(e.value) for name in text.KNOWN_CORPORA)


# ------------------------------------------------------------------------------------ TFDS


@pytest.fixture
def mock_tfds(request):
  """Random fake text records behind the real `tfds.data_source` -> `load_text` path."""
  with mocked_tfds(request.param):
    yield request.param


def _texts(name, split, count):
  """The fake records' text as the mocked `tfds.data_source` returns it, as UTF-8 bytes."""
  import tensorflow_datasets as tfds
  source = tfds.data_source(name, split=split, download=False)
  return [text._as_bytes(source[i]["text"]) for i in range(count)]


@pytest.mark.parametrize("mock_tfds", [1], indirect=True)
def test_tiny_shakespeare_through_mocked_tfds(mock_tfds, tmp_path):
  splits = text.load_text(_cfg(name="tiny_shakespeare", data_dir=str(tmp_path)))
  (train_text,) = _texts("tiny_shakespeare", "train", 1)
  (test_text,) = _texts("tiny_shakespeare", "test", 1)
  assert len(train_text) >= 10  # The mock's strings are 10 to 19 characters.
  assert splits.train.tobytes() == train_text and splits.test.tobytes() == test_text
  assert splits.train.dtype == np.uint8 and splits.name == "tiny_shakespeare"


@pytest.mark.parametrize("mock_tfds", [6], indirect=True)
def test_lm1b_joins_examples_and_caps_through_mocked_tfds(mock_tfds, tmp_path):
  splits = text.load_text(_cfg(name="lm1b", data_dir=str(tmp_path)))
  texts = _texts("lm1b", "train", 6)
  assert len(set(texts)) == 6  # Distinct records, so the order below is checked.
  assert splits.train.tobytes() == b"\0".join(texts)
  assert int(np.sum(splits.train == text.SEPARATOR)) == 5
  capped = text.load_text(_cfg(name="lm1b", data_dir=str(tmp_path), max_train_bytes=25,
                               max_test_bytes=3))
  assert capped.train.tobytes() == b"\0".join(texts)[:25]
  assert capped.test.tobytes() == b"\0".join(_texts("lm1b", "test", 6))[:3]


def test_text_feature_values_become_utf8_bytes():
  assert text._as_bytes("é€") == b"\xc3\xa9\xe2\x82\xac"
  assert text._as_bytes(b"\xc3\xa9") == b"\xc3\xa9"
  assert text._as_bytes(np.array("é", dtype=object)) == b"\xc3\xa9"


@pytest.mark.parametrize("name", ["tiny_shakespeare", "lm1b"])
def test_unprepared_text_fails_fast_with_the_command(name, tmp_path):
  start = time.monotonic()
  with pytest.raises(DatasetNotPrepared) as e:
    text.load_text(_cfg(name=name, data_dir=str(tmp_path)))
  assert time.monotonic() - start < 10
  message = str(e.value)
  assert "\n" not in message
  assert f"'python -m resjax.data.prepare --dataset {name} --data_dir {tmp_path}'" in message
  assert "config.data.name=stdlib" in message
  assert not list(tmp_path.iterdir())  # Nothing downloaded or created.


# --------------------------------------------------------------------------------- windows


def test_window_starts_are_a_function_of_seed_and_step_and_in_range():
  starts = text.window_starts(seed=3, step=7, num_tokens=1000, batch_size=64, context=32)
  assert starts.dtype == np.int32 and starts.shape == (64,)
  np.testing.assert_array_equal(starts, text.window_starts(3, 7, 1000, 64, 32))
  assert not np.array_equal(starts, text.window_starts(3, 8, 1000, 64, 32))
  assert not np.array_equal(starts, text.window_starts(4, 7, 1000, 64, 32))
  # The last window start is num_tokens - context - 1 (its last target is the last token).
  tight = text.window_starts(0, 0, num_tokens=34, batch_size=400, context=32)
  assert set(tight.tolist()) == {0, 1}
  with pytest.raises(ConfigError, match="context"):
    text.window_starts(0, 0, num_tokens=32, batch_size=4, context=32)


def test_gather_windows_matches_numpy_and_targets_shift_by_one():
  tokens = np.random.default_rng(0).integers(0, 256, 500).astype(np.uint8)
  starts = text.window_starts(1, 2, len(tokens), batch_size=8, context=16)
  gather = jax.jit(functools.partial(text.gather_windows, context=16))
  inputs, targets = (np.asarray(a) for a in gather(jax.device_put(tokens), starts))
  assert inputs.dtype == np.int32 and targets.dtype == np.int32
  assert inputs.shape == targets.shape == (8, 16)
  for b, s in enumerate(starts):
    np.testing.assert_array_equal(inputs[b], tokens[s:s + 16])
    np.testing.assert_array_equal(targets[b], tokens[s + 1:s + 17])
  np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
  # Bytes above 127 stay positive ids (no int8 wrap-around).
  assert inputs.max() > 127 and inputs.min() >= 0


def test_eval_starts_tile_the_split_without_overlap():
  starts = text.eval_starts(num_tokens=100, context=10)
  np.testing.assert_array_equal(starts, np.arange(0, 90, 10))  # (100 - 1) // 10 = 9 windows.
  targets = np.concatenate([np.arange(s + 1, s + 11) for s in starts])
  np.testing.assert_array_equal(targets, np.arange(1, 91))  # Each target once, in order.
  assert text.eval_starts(num_tokens=101, context=10).tolist() == list(range(0, 100, 10))
  np.testing.assert_array_equal(text.eval_starts(100, 10, max_windows=3), [0, 40, 80])
  np.testing.assert_array_equal(text.eval_starts(100, 10, max_windows=50), starts)
  with pytest.raises(ConfigError):
    text.eval_starts(num_tokens=10, context=10)
