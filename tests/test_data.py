"""Tests for resjax.data: the image splits, the augmentation, and offline preparation."""

import hashlib
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import F32_EPS, f32_tol, mocked_tfds
from resjax.data import images
from resjax.data import prepare
from resjax.errors import ConfigError, DatasetNotPrepared, UserError


# sha256 of the digits test images and labels as resjax splits them (first 16 hex digits).
DIGITS_TEST_FINGERPRINT = "0031108973c9429b"


def _cfg(**fields):
  return ml_collections.ConfigDict(fields)


# ---------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
  return images.load_images(_cfg(name="digits"))


def test_digits_shapes_dtypes_and_split_sizes(digits):
  assert digits.train_images.shape == (1497, 8, 8, 1)
  assert digits.test_images.shape == (300, 8, 8, 1)
  assert digits.train_images.dtype == np.uint8 and digits.test_images.dtype == np.uint8
  assert digits.train_labels.dtype == np.int32 and digits.test_labels.dtype == np.int32
  assert digits.train_labels.shape == (1497,) and digits.test_labels.shape == (300,)
  assert digits.num_classes == 10
  for labels in (digits.train_labels, digits.test_labels):
    assert set(np.unique(labels)) == set(range(10))
  # 0..16 scaled by 255/16 and rounded: only those 17 levels, the top one 255.
  levels = {round(v * 255 / 16) for v in range(17)}
  assert set(np.unique(digits.train_images)) <= levels
  assert digits.train_images.max() == 255


def test_digits_split_is_fixed_and_disjoint(digits):
  again = images.load_images(_cfg(name="digits"))
  for field in ("train_images", "train_labels", "test_images", "test_labels"):
    np.testing.assert_array_equal(getattr(again, field), getattr(digits, field))
  # The 1797 digits images are all distinct, so disjoint images mean disjoint examples.
  train = {x.tobytes() for x in digits.train_images}
  test = {x.tobytes() for x in digits.test_images}
  assert len(train) == 1497 and len(test) == 300 and not train & test
  # Pinned: the split is part of published numbers, so any change (code or numpy) must fail.
  fingerprint = hashlib.sha256(digits.test_images.tobytes() + digits.test_labels.tobytes())
  assert fingerprint.hexdigest()[:16] == DIGITS_TEST_FINGERPRINT



def test_digits_mean_is_the_train_mean(digits):
  assert digits.mean.shape == (8, 8, 1) and digits.mean.dtype == np.float32
  # The same float64 mean, rounded once to float32: within eps / 2 of it, relatively.
  np.testing.assert_allclose(digits.mean, digits.train_images.mean(0) / 255.0, rtol=F32_EPS)
  everything = np.concatenate([digits.train_images, digits.test_images]).mean(0) / 255.0
  assert np.abs(everything - digits.mean).max() > 1e-3  # Test images must not leak in.


def test_sizes_keep_the_first_examples(digits):
  small = images.load_images(_cfg(name="digits", train_size=100, test_size=20))
  np.testing.assert_array_equal(small.train_images, digits.train_images[:100])
  np.testing.assert_array_equal(small.test_labels, digits.test_labels[:20])
  np.testing.assert_allclose(small.mean, digits.train_images[:100].mean(0) / 255.0, rtol=F32_EPS)
  with pytest.raises(ConfigError, match="train_size=2000"):
    images.load_images(_cfg(name="digits", train_size=2000))
  with pytest.raises(ConfigError, match="test_size"):
    images.load_images(_cfg(name="digits", test_size=0))


def test_unknown_name_lists_the_known_ones():
  with pytest.raises(ConfigError) as e:
    images.load_images(_cfg(name="mnist"))
  assert all(name in str(e.value) for name in ("digits", "cifar10", "cifar100"))


def test_normalize_subtracts_the_mean_in_unit_scale():
  x = np.array([[[[0], [255]]]], np.uint8)
  mean = np.full((1, 2, 1), 0.5, np.float32)
  out = jax.jit(images.normalize)(x, mean)
  assert out.dtype == jnp.float32
  # x / 255 (maybe x * (1 / 255): two roundings of values <= 1), then - 0.5 (exact here).
  np.testing.assert_allclose(np.asarray(out), [[[[-0.5], [0.5]]]], rtol=0, atol=f32_tol())


# --------------------------------------------------------------------------------- augment


def _candidates(x, pad):
  """All (2*pad+1)^2 crops x 2 flips of zero-padded `x` [H, W, C], with their (dy, dx, flip)."""
  h, w, _ = x.shape
  padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
  crops, keys = [], []
  for dy in range(2 * pad + 1):
    for dx in range(2 * pad + 1):
      crop = padded[dy:dy + h, dx:dx + w]
      for flipped in (False, True):
        crops.append(crop[:, ::-1] if flipped else crop)
        keys.append((dy, dx, flipped))
  return np.stack(crops), keys


def _identify(x, y, pad):
  """The unique (dy, dx, flip) turning x into y; fails if none or several match."""
  crops, keys = _candidates(x, pad)
  hits = np.flatnonzero(np.all(crops == y[None], axis=(1, 2, 3)))
  assert len(hits) == 1, f"{len(hits)} candidate crops match"
  return keys[hits[0]]


# One jitted function and one batch shape for all tests below: each compile costs ~1 s.
_augment = jax.jit(images.augment, static_argnames=("pad", "flip"))
_BATCH = 2000


def _random_images(n, seed=0):
  # Continuous values: no two candidate crops of one image coincide.
  return np.random.default_rng(seed).normal(size=(n, 8, 8, 3)).astype(np.float32)


def test_augment_without_pad_or_flip_is_identity():
  x = _random_images(4)
  out = images.augment(jax.random.key(1), x, pad=0, flip=False)
  np.testing.assert_array_equal(np.asarray(out), x)


def test_augment_is_a_crop_of_the_zero_padded_image():
  x = _random_images(_BATCH)
  out = np.asarray(_augment(jax.random.key(2), x, pad=4, flip=True))
  assert out.shape == x.shape and out.dtype == np.float32
  found = [_identify(xi, yi, pad=4) for xi, yi in zip(x[:64], out[:64])]
  assert len(set(found)) > 20  # Examples in one batch get their own crop and flip.
  again = np.asarray(_augment(jax.random.key(2), x, pad=4, flip=True))
  other = np.asarray(_augment(jax.random.key(3), x, pad=4, flip=True))
  np.testing.assert_array_equal(again, out)
  assert not np.array_equal(other, out)


def test_augment_draws_every_offset_and_flips_half_the_time():
  one = _random_images(1, seed=4)[0]
  x = np.broadcast_to(one, (_BATCH,) + one.shape)  # One image: only the draws differ.
  out = np.asarray(_augment(jax.random.key(5), x, pad=4, flip=True))
  crops, keys = _candidates(one, pad=4)
  hits = np.all(out[:, None] == crops[None], axis=(2, 3, 4))  # [examples, 162 candidates]
  assert np.all(hits.sum(1) == 1)
  found = [keys[k] for k in hits.argmax(1)]
  # Each of the 81 offsets, borders included (0 and 2*pad), has p = 1/81: ~25 hits each.
  assert {(dy, dx) for dy, dx, _ in found} == {(dy, dx) for dy in range(9) for dx in range(9)}
  flips = sum(flipped for _, _, flipped in found)
  assert 900 < flips < 1100  # Binomial(2000, 1/2): sd ~22.


# ------------------------------------------------------------------------------ TFDS mocks


@pytest.fixture
def mock_tfds():
  """Random fake CIFAR records behind the real `tfds.data_source` -> `load_images` path."""
  with mocked_tfds(7):
    yield


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_through_mocked_tfds(mock_tfds, name, classes, tmp_path):
  del mock_tfds
  splits = images.load_images(_cfg(name=name, data_dir=str(tmp_path)))
  assert splits.train_images.shape == (7, 32, 32, 3)
  assert splits.test_images.shape == (7, 32, 32, 3)
  assert splits.train_images.dtype == np.uint8 and splits.train_labels.dtype == np.int32
  assert splits.num_classes == classes
  assert splits.train_labels.min() >= 0 and splits.train_labels.max() < classes
  assert splits.mean.shape == (32, 32, 3) and splits.mean.dtype == np.float32
  small = images.load_images(_cfg(name=name, data_dir=str(tmp_path), train_size=5))
  assert small.train_images.shape == (5, 32, 32, 3)


def test_unprepared_dataset_fails_fast_with_the_command(tmp_path):
  start = time.monotonic()
  with pytest.raises(DatasetNotPrepared) as e:
    images.load_images(_cfg(name="cifar10", data_dir=str(tmp_path)))
  assert time.monotonic() - start < 10
  message = str(e.value)
  assert "\n" not in message
  assert f"python -m resjax.data.prepare --dataset cifar10 --data_dir {tmp_path}" in message
  assert "pip install 'resjax[prepare]'" in message and "config.data.name=digits" in message
  assert not list(tmp_path.iterdir())  # Nothing downloaded or created.


# ---------------------------------------------------------------------------- preparation


def _cifar10_archive(path, per_file=2, seed=0, files=None):
  """Writes a CIFAR-10 binary archive; returns {filename: (images HWC, labels)} written."""
  rng = np.random.default_rng(seed)
  names = files or [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
  written, members = {}, {}
  for name in names:
    labels = rng.integers(0, 10, per_file, dtype=np.uint8)
    chw = rng.integers(0, 256, (per_file, 3, 32, 32), dtype=np.uint8)  # R, G, B planes.
    records = np.concatenate([labels[:, None], chw.reshape(per_file, -1)], axis=1)
    members[name] = records.tobytes()
    written[name] = (chw.transpose(0, 2, 3, 1), labels)
  members["batches.meta.txt"] = ("\n".join(f"class{i}" for i in range(10)) + "\n").encode()
  with tarfile.open(path, "w:gz") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return written


def _run(*args, timeout=180):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def _as_set(images_, labels):
  return {(x.tobytes(), int(y)) for x, y in zip(images_, labels)}


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="preparing needs TensorFlow: pip install 'resjax[prepare]'")
def test_prepare_from_archive_offline(tmp_path):
  data_dir = tmp_path / "tfds"
  # A broken archive (no test file) fails after the train split was written: nothing may
  # remain that looks prepared, and the good run after it, into the same data_dir, must not
  # reuse any of it.
  broken = tmp_path / "broken" / "cifar-10-binary.tar.gz"
  broken.parent.mkdir()
  _cifar10_archive(broken, seed=1, files=[f"data_batch_{i}.bin" for i in range(1, 6)])
  failed = _run("-m", "resjax.data.prepare", "--dataset", "cifar10", "--data_dir", str(data_dir),
                "--archive", str(broken))
  assert failed.returncode != 0
  assert "test_batch.bin" in failed.stderr
  assert not (data_dir / "cifar10" / "3.0.2").exists()
  assert not [p for p in data_dir.rglob("*") if "incomplete" in p.name or "extract" in p.name]
  with pytest.raises(DatasetNotPrepared):
    images.load_images(_cfg(name="cifar10", data_dir=str(data_dir)))

  archive = tmp_path / "cifar-10-binary.tar.gz"
  written = _cifar10_archive(archive)
  done = _run("-m", "resjax.data.prepare", "--dataset", "cifar10", "--data_dir", str(data_dir),
              "--archive", str(archive))
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"--config.data.data_dir={data_dir}" in done.stdout
  assert "checksum check is SKIPPED" in done.stderr  # Not the published archive: said so.
  assert not [p for p in data_dir.rglob("*") if "extract" in p.name]

  # Read back as training does, in a fresh process, which must not import TensorFlow.
  out = tmp_path / "loaded.npz"
  loader = textwrap.dedent(f"""
      import sys, ml_collections, numpy as np
      from resjax.data import images
      s = images.load_images(ml_collections.ConfigDict(
          dict(name='cifar10', data_dir={str(data_dir)!r})))
      assert 'tensorflow' not in sys.modules, 'loading imported TensorFlow'
      np.savez({str(out)!r}, train_x=s.train_images, train_y=s.train_labels,
               test_x=s.test_images, test_y=s.test_labels, classes=s.num_classes)
  """)
  loaded = _run("-c", loader)
  assert loaded.returncode == 0, loaded.stderr[-3000:]
  got = np.load(out)
  assert got["train_x"].shape == (10, 32, 32, 3) and got["test_x"].shape == (2, 32, 32, 3)
  assert got["train_x"].dtype == np.uint8 and int(got["classes"]) == 10
  train_written = [written[f"data_batch_{i}.bin"] for i in range(1, 6)]
  expected_train = set().union(*(_as_set(x, y) for x, y in train_written))
  # TFDS stores examples in a hashed order, so compare (image, label) pairs as sets.
  assert _as_set(got["train_x"], got["train_y"]) == expected_train
  assert _as_set(got["test_x"], got["test_y"]) == _as_set(*written["test_batch.bin"])
  info = json.loads((data_dir / "cifar10" / "3.0.2" / "dataset_info.json").read_text())
  assert info["fileFormat"] == "array_record"


def test_missing_tensorflow_is_one_line_naming_the_extra(monkeypatch, tmp_path, capsys):
  assert prepare.missing_tensorflow_message() == (
      "preparing datasets needs TensorFlow: pip install 'resjax[prepare]'")
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # Makes `import tensorflow` fail.
  with pytest.raises(UserError) as e:
    prepare.main(["--dataset", "cifar10", "--data_dir", str(tmp_path / "tfds")])
  assert str(e.value) == prepare.missing_tensorflow_message()
  monkeypatch.setattr(sys, "argv", ["resjax-prepare", "--dataset", "cifar10"])
  with pytest.raises(SystemExit) as exit_info:
    prepare.run()
  assert exit_info.value.code == 1
  err = capsys.readouterr().err
  assert err.strip().splitlines() == [f"error: {prepare.missing_tensorflow_message()}"]
  assert not (tmp_path / "tfds").exists()  # Failed before touching the disk.
