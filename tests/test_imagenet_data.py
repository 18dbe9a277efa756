"""Tests for resjax.data.imagenet: the ResNet-paper crops, exact batches per host, and errors."""

import io
import json
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import assert_f32_close, mocked_tfds
from resjax.data import imagenet
from resjax import train
from resjax.data import prepare
from resjax.errors import ConfigError, DatasetNotPrepared, UserError

SIZE = 32  # Test image size: short sides scale to round(256 * 32/224) = 37 and 69.
NUM_EXAMPLES = 10


def _cfg(**fields):
  return ml_collections.ConfigDict(fields)


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def _random_image(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- one image


def test_sizes_scale_with_the_image_size():
  assert imagenet._scaled(256, 224) == 256 and imagenet._scaled(480, 224) == 480
  assert imagenet._scaled(256, SIZE) == 37 and imagenet._scaled(480, SIZE) == 69
  assert imagenet.resized_size(375, 500, 256) == (256, 341)  # Shorter side first or second.
  assert imagenet.resized_size(500, 375, 256) == (341, 256)


@pytest.mark.parametrize("height,width,top,left", [(37, 50, 2, 9), (60, 37, 14, 2)])
def test_centre_crop_of_an_image_at_the_eval_size_is_a_slice(height, width, top, left):
  # Shorter side already 37: no resampling, so the centre crop is an exact slice; offsets
  # floor((side - 32) / 2) from the top-left.
  image = _random_image(height, width)
  expected = image[top:top + SIZE, left:left + SIZE]
  for encoded in (image, _png(image)):  # A decoded array or encoded bytes, as stored.
    out = imagenet.eval_image(encoded, size=SIZE, short_side=37)
    assert out.dtype == np.uint8 and out.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(out, expected)


def test_centre_crop_of_a_larger_image_resizes_then_crops():
  image = _random_image(111, 150, seed=1)  # Shorter side 111 -> 37: a third, 150 -> 50.
  full = np.asarray(Image.fromarray(image).resize((50, 37), Image.Resampling.BILINEAR))
  out = imagenet.eval_image(_png(image), size=SIZE, short_side=37)
  np.testing.assert_array_equal(out, full[2:34, 9:41])


def test_grey_images_become_rgb():
  grey = _random_image(37, 40)[..., :1]
  out = imagenet.eval_image(grey, size=SIZE, short_side=37)
  assert out.shape == (SIZE, SIZE, 3)
  np.testing.assert_array_equal(out[..., 0], grey[2:34, 4:36, 0])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_train_crops_cover_every_offset_and_flip_half_the_time():
  # Short side fixed at the image's own (37): every view is an exact slice, maybe mirrored.
  image = _random_image(37, 45, seed=2)
  keys = [(t, l, f) for t in range(6) for l in range(14) for f in (False, True)]
  candidates = np.stack([image[t:t + SIZE, l:l + SIZE][:, ::-1] if f
                         else image[t:t + SIZE, l:l + SIZE] for t, l, f in keys])
  found = []
  for i in range(1500):
    out = imagenet.train_image(image, np.random.default_rng(i), size=SIZE,
                               short_side_range=(37, 37), lighting_std=0.0)
    hits = np.flatnonzero((candidates == out[None]).all(axis=(1, 2, 3)))
    assert len(hits) == 1
    found.append(keys[hits[0]])
  # Offsets 0..37-32 down and 0..45-32 across, borders included: 84 offsets, ~18 hits each.
  assert {(t, l) for t, l, _ in found} == {(t, l) for t in range(6) for l in range(14)}
  assert 650 < sum(f for _, _, f in found) < 850  # Binomial(1500, 1/2): sd ~19.


def test_scale_augmentation_draws_every_short_side_in_the_range():
  draws = [imagenet.train_crop(np.random.default_rng(i), 300, 450, SIZE, (37, 69))
           for i in range(2000)]
  shorts = [min(resized) for resized, _, _, _ in draws]
  assert set(shorts) == set(range(37, 70))  # Inclusive at both ends, like the paper's [256, 480].
  for (new_h, new_w), top, left, _ in draws:
    assert abs(new_w - 1.5 * new_h) <= 1  # Aspect ratio kept.
    assert 0 <= top <= new_h - SIZE and 0 <= left <= new_w - SIZE


def test_lighting_shifts_every_pixel_along_the_luminance_direction_mostly():
  grey = np.full((4, 4, 3), 128, np.uint8)  # Mid-grey: no clipping.
  shifts = []
  for i in range(400):
    out = imagenet.lighting(grey, np.random.default_rng(i), std=0.1).astype(np.int64) - 128
    assert (out == out[0, 0]).all()  # One RGB offset for the whole image.
    shifts.append(out[0, 0])
  shifts = np.array(shifts, np.float64)
  # The offset's covariance is dominated by the first eigenvector, the luminance direction
  # (1, 1, 1)/sqrt(3): lambda_1 = 0.2175 against 0.0188 and 0.0045.
  _, vectors = np.linalg.eigh(np.cov(shifts.T))
  assert abs(vectors[:, -1] @ np.ones(3) / np.sqrt(3)) > 0.99
  # Its standard deviation is 255 * 0.1 * 0.2175 = 5.5 levels along that direction.
  assert 4.5 < np.std(shifts @ np.ones(3) / np.sqrt(3)) < 6.5


def test_normalize_uses_the_per_channel_statistics():
  x = np.array([[[0, 128, 255]]], np.uint8)
  out = np.asarray(jax.jit(imagenet.normalize)(x))
  expected = (np.array([0, 128, 255]) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  # float32 against float64: x / 255, - mean, / std, 3 chained roundings (and the float32 mean and
  # std) of values <= 1 before the division by std >= 0.224.
  assert_f32_close(out[0, 0], expected, depth=3, scale=1 / 0.224)


# ---------------------------------------------------------------------------- TFDS mocks


@pytest.fixture
def mock_tfds():
  """Random fake ImageNet records (5 to 49 pixels a side) behind the real `tfds.data_source`."""
  with mocked_tfds(NUM_EXAMPLES, pillow=True) as tfds:
    yield tfds


@pytest.fixture
def records(mock_tfds):
  """The mocked records: (JPEG bytes, label) of each index, read without resjax."""
  source = mock_tfds.data_source("imagenet2012", split="validation", download=False,
                                 decoders={"image": mock_tfds.decode.SkipDecoding()})
  return [(source[i]["image"], int(source[i]["label"])) for i in range(NUM_EXAMPLES)]


def _source(tmp_path, split="train", **fields):
  fields = {"image_size": SIZE, "num_workers": 0, "data_dir": str(tmp_path), **fields}
  return imagenet.ImageNetSource(_cfg(**fields), split)


def test_train_batches_shapes_and_determinism(mock_tfds, records, tmp_path):
  with _source(tmp_path) as source, _source(tmp_path, prefetch=False) as other:
    assert source.num_examples == NUM_EXAMPLES and source.num_classes == 1000
    assert source.mean.shape == source.std.shape == (3,)
    assert source.train_short_side == (37, 69) and source.eval_short_side == 37
    images, labels = source.train_batch(seed=0, step=3, batch_size=4)
    assert images.shape == (4, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert labels.shape == (4,) and labels.dtype == np.int32
    next_images, _ = source.train_batch(seed=0, step=4, batch_size=4)  # Served by the prefetch.
    # A fresh source, without threads or prefetch, gives the same batches in any order.
    for step, expected in ((4, next_images), (3, images)):
      np.testing.assert_array_equal(other.train_batch(seed=0, step=step, batch_size=4)[0],
                                    expected)
    assert not np.array_equal(source.train_batch(seed=1, step=3, batch_size=4)[0], images)
    # Labels are those of the records the batch names.
    indices = source.train_indices(seed=0, step=3, batch_size=4)
    np.testing.assert_array_equal(labels, [records[i][1] for i in indices])


def test_an_epoch_visits_every_example_once(mock_tfds, tmp_path):
  with _source(tmp_path, prefetch=False) as source:
    for epoch in range(2):  # Steps of 5 of 10 examples: two steps an epoch.
      seen = np.concatenate([source.train_indices(7, 2 * epoch + s, 5) for s in range(2)])
      assert sorted(seen.tolist()) == list(range(NUM_EXAMPLES))
    orders = [np.concatenate([source.train_indices(7, 2 * e + s, 5) for s in range(2)])
              for e in range(2)]
    assert not np.array_equal(*orders)  # Reshuffled each epoch.
    # A batch across the epoch boundary: steps of 4 over 10 examples, step 2 holds 8, 9, 0, 1.
    across = source.train_indices(7, 2, 4)
    np.testing.assert_array_equal(across[:2], source._order(7, 0)[8:])
    np.testing.assert_array_equal(across[2:], source._order(7, 1)[:2])


def test_hosts_get_disjoint_equal_parts_of_the_same_global_batch(mock_tfds, tmp_path):
  with _source(tmp_path) as source:
    # Step 3 of 6 over 10 examples: positions 18..23, within epoch 1 (18..19) and 2 (20..23).
    images, labels = source.train_batch(seed=5, step=3, batch_size=6)
    parts = [source.train_batch(seed=5, step=3, batch_size=6, process_index=p, process_count=3)
             for p in range(3)]
    assert all(x.shape == (2, SIZE, SIZE, 3) and y.shape == (2,) for x, y in parts)
    np.testing.assert_array_equal(np.concatenate([x for x, _ in parts]), images)
    np.testing.assert_array_equal(np.concatenate([y for _, y in parts]), labels)
    # Within an epoch the hosts' examples are distinct (a batch across the boundary may repeat
    # an example, once from each epoch).
    host_indices = [set(source.train_indices(5, 2, 6, p, 3).tolist()) for p in range(3)]
    assert sum(map(len, host_indices)) == len(set.union(*host_indices)) == 6
    with pytest.raises(ConfigError, match="does not split over 4 hosts"):
      source.train_batch(seed=5, step=1, batch_size=6, process_index=0, process_count=4)


@pytest.mark.parametrize("hosts", [1, 2])
def test_eval_covers_every_example_once(mock_tfds, records, tmp_path, hosts):
  with _source(tmp_path, split="validation") as source:
    per_host = [list(source.eval_batches(4, process_index=p, process_count=hosts))
                for p in range(hosts)]
  assert all(len(batches) == 3 for batches in per_host)  # ceil(10 / 4) on every host.
  got_labels, got_images = [], []
  for k in range(3):  # Global batch k is the hosts' k-th batches side by side.
    images = np.concatenate([per_host[p][k][0] for p in range(hosts)])
    labels = np.concatenate([per_host[p][k][1] for p in range(hosts)])
    valid = np.concatenate([per_host[p][k][2] for p in range(hosts)])
    assert images.shape == (4, SIZE, SIZE, 3) and valid.dtype == bool
    assert valid.tolist() == ([True] * 4 if k < 2 else [True, True, False, False])
    assert not images[~valid].any() and not labels[~valid].any()
    got_images.append(images[valid])
    got_labels.append(labels[valid])
  np.testing.assert_array_equal(np.concatenate(got_labels), [label for _, label in records])
  expected = [imagenet.eval_image(jpeg, size=SIZE, short_side=37) for jpeg, _ in records]
  np.testing.assert_array_equal(np.concatenate(got_images), np.stack(expected))


# ------------------------------------------------------------- resuming, worker processes


def _steps(source, seed, steps, batch_size=4):
  return [source.train_batch(seed=seed, step=k, batch_size=batch_size) for k in steps]


def _assert_batches_equal(got, expected):
  assert len(got) == len(expected)
  for (images, labels), (want_images, want_labels) in zip(got, expected):
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)


def test_a_resumed_run_sees_the_batches_of_an_uninterrupted_one(mock_tfds, tmp_path):
  # Two seeds' streams, as a trainer with two replicas holds them; the checkpoint is the
  # trainer's own (train.save / train.restore), the loader a new one.
  with _source(tmp_path) as straight:
    expected = {seed: _steps(straight, seed, range(6)) for seed in (0, 1)}
  manager = train.checkpoint_manager(str(tmp_path / "ckpt"))
  state = {"step": np.array([3], np.int32)}
  with _source(tmp_path) as first:
    for seed in (0, 1):
      _assert_batches_equal(_steps(first, seed, range(3)), expected[seed][:3])
    train.save(manager, 3, state, {}, first)
    manager.wait_until_finished()
  saved = json.loads((tmp_path / "ckpt" / "3" / train.DATA_ITEM / "process_0-of-1.json")
                     .read_text())
  assert sorted((s["seed"], s["step"]) for s in saved["streams"]) == [(0, 3), (1, 3)]
  with _source(tmp_path) as resumed:
    restored, _ = train.restore(manager, state, resumed)
    assert int(restored["step"][0]) == 3
    # The streams go on from grain's restored iterators (started at step 0), not afresh at 3.
    assert {key: stream.start for key, stream in resumed._streams.items()} == {
        (0, 4, 0, 1): 0, (1, 4, 0, 1): 0}
    for seed in (0, 1):
      _assert_batches_equal(_steps(resumed, seed, range(3, 6)), expected[seed][3:])
  manager.close()


def test_a_checkpoint_without_the_data_item_still_resumes(mock_tfds, tmp_path):
  with _source(tmp_path) as straight:
    expected = _steps(straight, 0, range(4))
  manager = train.checkpoint_manager(str(tmp_path / "ckpt"))
  state = {"step": np.array([2], np.int32)}
  train.save(manager, 2, state, {})  # As other tasks, and checkpoints before the item, save.
  manager.wait_until_finished()
  assert not (tmp_path / "ckpt" / "2" / train.DATA_ITEM).exists()
  with _source(tmp_path) as resumed:
    restored, _ = train.restore(manager, state, resumed)
    assert int(restored["step"][0]) == 2 and not resumed._streams
    _assert_batches_equal(_steps(resumed, 0, range(2, 4)), expected[2:])
  manager.close()


def test_worker_processes_make_the_batches_of_the_trainer_process(records, tmp_path):
  # The records as a plain list: grain's worker processes get a pickled copy (the mocked TFDS
  # source would encode its images again there, with TensorFlow).
  stored = [{"image": image, "label": label} for image, label in records]
  sources = {workers: imagenet.ImageNetSource(_cfg(image_size=SIZE, num_workers=workers), "train",
                                              records=stored)
             for workers in (0, 2)}
  try:
    batches = {workers: _steps(source, 5, range(4), batch_size=3)
               for workers, source in sources.items()}
    _assert_batches_equal(batches[2], batches[0])  # Steps 0, 2 from one worker, 1, 3 the other.
    state = sources[2].get_state()
    evals = {workers: list(source.eval_batches(4)) for workers, source in sources.items()}
    for (x2, y2, v2), (x0, y0, v0) in zip(*evals.values(), strict=True):
      for a, b in ((x2, x0), (y2, y0), (v2, v0)):
        np.testing.assert_array_equal(a, b)
    later = _steps(sources[0], 5, range(4, 6), batch_size=3)
  finally:
    for source in sources.values():
      source.close()
  with imagenet.ImageNetSource(_cfg(image_size=SIZE, num_workers=2), "train",
                               records=stored) as resumed:
    resumed.set_state(state)  # Two workers' iterator state: each worker goes on from its own.
    _assert_batches_equal(_steps(resumed, 5, range(4, 6), batch_size=3), later)


# ----------------------------------------------------------------------- missing data


def test_unprepared_imagenet_fails_fast_with_the_instructions(tmp_path):
  start = time.monotonic()
  with pytest.raises(DatasetNotPrepared) as e:
    _source(tmp_path)
  assert time.monotonic() - start < 10
  message = str(e.value)
  assert "\n" not in message
  assert "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar" in message
  assert "image-net.org" in message
  assert (f"'python -m resjax.data.prepare --dataset imagenet2012 --manual_dir MANUAL_DIR "
          f"--data_dir {tmp_path}'") in message
  assert not list(tmp_path.iterdir())  # Nothing downloaded or created.


def test_prepare_arguments_fail_before_touching_anything(tmp_path, monkeypatch, capsys):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "ILSVRC2012_img_train.tar").write_bytes(b"")
  data_dir = tmp_path / "tfds"
  cases = [
      (["--dataset", "imagenet2012"], "pass it as --manual_dir"),
      (["--dataset", "imagenet2012", "--manual_dir", str(manual)],
       f"--manual_dir {manual} lacks ILSVRC2012_img_val.tar:"),
      (["--dataset", "imagenet2012", "--manual_dir", str(manual), "--archive", str(manual)],
       "--archive does not apply to imagenet2012"),
      (["--dataset", "lm1b", "--manual_dir", str(manual)], "--manual_dir is only for imagenet2012"),
  ]
  for argv, fragment in cases:
    with pytest.raises(UserError) as e:
      prepare.main([*argv, "--data_dir", str(data_dir)])
    assert fragment in str(e.value) and "\n" not in str(e.value)
  # Text sets are accepted and go on to the TensorFlow check (absent here by construction).
  monkeypatch.setitem(sys.modules, "tensorflow", None)
  for name in ("tiny_shakespeare", "lm1b"):
    with pytest.raises(UserError, match="needs TensorFlow"):
      prepare.main(["--dataset", name, "--data_dir", str(data_dir)])
  monkeypatch.setattr(sys, "argv", ["resjax-prepare", "--dataset", "imagenet2012"])
  with pytest.raises(SystemExit) as exit_info:
    prepare.run()
  assert exit_info.value.code == 1
  assert len(capsys.readouterr().err.strip().splitlines()) == 1
  assert not data_dir.exists()
