"""Tests for resjax.data.fineweb and the fineweb task, on small shards written here."""

import json
import math
import os

import ml_collections
import numpy as np
import pytest

from resjax import configs, inspect_model, tasks, train
from resjax.data import fineweb
from resjax.errors import ConfigError, DatasetNotPrepared, UserError

CONTEXT = 16


def write_shard(path, tokens, *, magic=20240520, version=1, count=None, extra=b""):
  """A shard as the record's files are laid out: 256 int32 header, then uint16 tokens."""
  tokens = np.asarray(tokens)
  header = np.zeros(256, "<i4")
  header[:3] = magic, version, len(tokens) if count is None else count
  with open(path, "wb") as f:
    f.write(header.tobytes() + tokens.astype("<u2").tobytes() + extra)
  return tokens.astype(np.uint16)


def gpt2_tokens(seed, n):
  return np.random.default_rng(seed).integers(0, fineweb.GPT2_VOCAB, n)


@pytest.fixture
def shards(tmp_path):
  """Two train shards (3000 and 1984 tokens) and two val shards (1000 and 700), written out of
  order, beside files that are not shards."""
  out = {"dir": tmp_path}
  out["train2"] = write_shard(tmp_path / "fineweb_train_000002.bin", gpt2_tokens(2, 1984))
  out["train1"] = write_shard(tmp_path / "fineweb_train_000001.bin", gpt2_tokens(1, 3000))
  out["val1"] = write_shard(tmp_path / "fineweb_val_000001.bin", gpt2_tokens(4, 700))
  out["val0"] = write_shard(tmp_path / "fineweb_val_000000.bin", gpt2_tokens(3, 1000))
  (tmp_path / "fineweb_train_000003.bin.incomplete").write_bytes(b"partial")
  (tmp_path / "README").write_text("not a shard")
  return out


def run_config(data_dir, val_tokens=160):
  """A tiny transformer on the shards: GPT-2 small's recipe at width 16, one block, context 16;
  evaluated on 10 windows unless told."""
  c = configs.lm_recipe(context=CONTEXT, width=16, depth=1, heads=2, mlp_ratio=2)
  c.data = ml_collections.ConfigDict({
      "name": "fineweb", "data_dir": None if data_dir is None else str(data_dir),
      "val_tokens": val_tokens})
  c.batch_size = 4
  c.schedule.update(total=3, warmup=2)
  c.optim.lr = 3e-3
  c.log_every, c.eval_every, c.checkpoint_every = 1, 3, 3
  c.eval_batch_size = 8
  return c


# ------------------------------------------------------------------------------------- shards


def test_a_shard_is_its_tokens_mapped_read_only(shards):
  tokens = fineweb.read_shard(str(shards["dir"] / "fineweb_train_000001.bin"))
  assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and tokens.shape == (3000,)
  # Little-endian uint16 after the 1024-byte header: ids above 255 and up to 50256 come back whole.
  np.testing.assert_array_equal(tokens, shards["train1"])
  assert tokens.max() > 40000
  with pytest.raises(ValueError, match="read-only"):
    tokens[0] = 1
  path = shards["dir"] / "fineweb_train_000009.bin"
  write_shard(path, [])
  assert fineweb.read_shard(str(path)).shape == (0,)


def test_each_split_is_its_own_shards_in_sorted_order(shards):
  d = str(shards["dir"])
  assert [os.path.basename(p) for p in fineweb.shard_paths(d, "train")] == [
      "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
  assert [os.path.basename(p) for p in fineweb.shard_paths(d, "val")] == [
      "fineweb_val_000000.bin", "fineweb_val_000001.bin"]
  val = fineweb.Shards(d, "val")
  assert val.sizes.tolist() == [1000, 700] and val.num_tokens == 1700
  # Read as one stream across the boundary between its shards.
  np.testing.assert_array_equal(val.read(990, 1010), np.concatenate([shards["val0"][990:],
                                                                     shards["val1"][:10]]))


# ------------------------------------------------------------------------------- train stream


def record_loader(shard_tokens, rows, context, steps):
  """The record's train loop written out: the next rows * context + 1 tokens of the current shard
  each step, then on to the next shard (cyclically) when the next step would not fit."""
  shard, pos, batch = 0, 0, rows * context
  for _ in range(steps):
    flat = shard_tokens[shard][pos:pos + batch + 1]
    yield np.stack([flat[r * context:r * context + context + 1] for r in range(rows)])
    pos += batch
    if pos + batch + 1 > len(shard_tokens[shard]):
      shard, pos = (shard + 1) % len(shard_tokens), 0


def test_train_stream_is_the_records_and_moves_on_at_the_end_of_a_shard(shards):
  stream = fineweb.TrainStream(fineweb.Shards(str(shards["dir"]), "train"), 4, CONTEXT)
  # (3000 - 1) // 64 = 46 steps in the first shard (its last 55 tokens unread). The second holds
  # 31 x 64 tokens, one short of a 31st batch with its last target: 30 steps.
  assert stream.steps_per_shard.tolist() == [46, 30] and stream.steps_per_pass == 76
  assert stream.position(45) == (0, 45 * 64) and stream.position(46) == (1, 0)
  assert stream.position(75) == (1, 29 * 64) and stream.position(76) == (0, 0)  # then the first
  expected = list(record_loader([shards["train1"], shards["train2"]], 4, CONTEXT, 160))
  for step in range(160):
    batch = stream.batch(step)
    assert batch.dtype == np.uint16 and batch.shape == (4, CONTEXT + 1)
    np.testing.assert_array_equal(batch, expected[step], err_msg=f"step {step}")
  # Step 46 starts the second shard at its first token; rows overlap by one token.
  np.testing.assert_array_equal(stream.batch(46)[0], shards["train2"][:CONTEXT + 1])
  np.testing.assert_array_equal(stream.batch(46)[1, 0], stream.batch(46)[0, -1])


def test_a_steps_batch_depends_on_the_step_alone(shards):
  a = tasks.load(run_config(shards["dir"]))
  b = tasks.load(run_config(shards["dir"]))
  forward = [a.train_batch(0, s, 4).copy() for s in (0, 50, 3, 200, 46)]
  backward = [b.train_batch(0, s, 4).copy() for s in (46, 200, 3, 50, 0)][::-1]
  for x, y in zip(forward, backward):
    np.testing.assert_array_equal(x, y)
  # Every seed of a row reads the same stream (paired seeds); steps differ.
  np.testing.assert_array_equal(a.train_batch(7, 3, 4), a.train_batch(0, 3, 4))
  assert not np.array_equal(a.train_batch(0, 3, 4), a.train_batch(0, 4, 4))


def test_a_shard_shorter_than_one_batch_fails_before_training(shards):
  c = run_config(shards["dir"])
  c.batch_size = 200  # 200 x 16 + 1 = 3201 tokens: more than either shard holds
  with pytest.raises(ConfigError) as e:
    tasks.load(c)
  message = str(e.value)
  assert "fineweb_train_000001.bin holds 3,000 tokens" in message and "3,201" in message
  assert "\n" not in message


# ------------------------------------------------------------------------------------- eval


def test_eval_windows_tile_the_first_val_tokens_once(shards):
  val = np.concatenate([shards["val0"], shards["val1"]])
  task = tasks.load(run_config(shards["dir"], val_tokens=1500))
  assert task.val.count == 1500 // CONTEXT == 93 and task.test_size == 93
  batches = list(task.eval_batches(40))
  assert [w.shape for w, _ in batches] == [(40, CONTEXT + 1)] * 3
  windows = np.concatenate([w for w, _ in batches])
  valid = np.concatenate([v for _, v in batches])
  assert valid.sum() == 93 and not valid[93:].any()  # the last batch is padded, masked out
  windows = windows[valid]
  # Window k is val[k * 16 : k * 16 + 17], across the boundary of the two val shards: the
  # targets of all windows are tokens 1 .. 93 * 16, each predicted once.
  for k in (0, 1, 62, 92):
    np.testing.assert_array_equal(windows[k], val[k * CONTEXT:k * CONTEXT + CONTEXT + 1])
  np.testing.assert_array_equal(windows[:, 1:].ravel(), val[1:93 * CONTEXT + 1])


def test_val_tokens_default_to_the_records_and_are_checked(shards):
  assert fineweb.check_val_tokens(None) == fineweb.VAL_TOKENS == 10_485_760
  for bad in (0, -5, 1.5, True, "100"):
    with pytest.raises(ConfigError, match="config.data.val_tokens"):
      fineweb.check_val_tokens(bad)
  with pytest.raises(ConfigError) as e:  # the default needs far more than these val shards hold
    tasks.load(run_config(shards["dir"], val_tokens=None))
  assert "hold 1,700 tokens, fewer than the 10,485,761" in str(e.value)
  assert "lower config.data.val_tokens" in str(e.value)
  with pytest.raises(ConfigError, match="fewer than one window"):
    tasks.load(run_config(shards["dir"], val_tokens=CONTEXT - 1))


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("fields, extra, what", [
    ({}, b"", None),  # replaced by a file shorter than a header below
    ({"magic": 20240521}, b"", "starts with magic 20240521, not 20240520"),
    ({"version": 2}, b"", "is shard format version 2; resjax reads version 1"),
    ({"count": 101}, b"", "declares 101 tokens in its header but holds 200 bytes"),
    ({"count": 99}, b"", "declares 99 tokens in its header but holds 200 bytes"),
    ({}, b"\0", "declares 100 tokens in its header but holds 201 bytes"),
])
def test_a_malformed_shard_is_one_line_naming_the_file(tmp_path, fields, extra, what):
  path = tmp_path / "fineweb_train_000001.bin"
  write_shard(path, gpt2_tokens(0, 100), extra=extra, **fields)
  if what is None:
    path.write_bytes(path.read_bytes()[:1000])
    what = "is 1000 bytes, shorter than the 1024-byte header"
  for read in (lambda: fineweb.read_shard(str(path)),
               lambda: fineweb.Shards(str(tmp_path), "train")):
    with pytest.raises(UserError) as e:
      read()
    message = str(e.value)
    assert message.startswith(f"{path} {what}") and "\n" not in message
    assert "python data/cached_fineweb10B.py 18" in message


def test_a_folder_without_shards_says_how_to_download_them(shards, tmp_path):
  for data_dir, what in [(tmp_path / "missing", "does not exist"),
                         (tmp_path / "README", "is not a folder")]:
    with pytest.raises(DatasetNotPrepared) as e:
      tasks.load(run_config(data_dir))
    assert str(e.value).startswith(f"{data_dir} {what}")
  for split in ("val", "train"):
    for p in tmp_path.glob(f"fineweb_{split}_*.bin"):
      p.unlink()
    with pytest.raises(DatasetNotPrepared) as e:
      tasks.load(run_config(tmp_path))
    message = str(e.value)
    assert message.startswith(f"{tmp_path} holds no fineweb_{split}_*.bin shards")
    assert "`python data/cached_fineweb10B.py 18`" in message and "modded-nanogpt" in message
    assert "\n" not in message
  for data_dir in (None, ""):
    with pytest.raises(ConfigError, match=r"^config.data.data_dir is .*--config.data.data_dir="):
      tasks.load(run_config(data_dir))
  with pytest.raises(ConfigError, match="is remote"):
    tasks.load(run_config("gs://bucket/fineweb10B"))


# ------------------------------------------------------------------------------ the trainer


def test_the_models_vocabulary_is_gpt2s_padded_to_a_multiple_of_128(shards):
  assert fineweb.VOCAB_SIZE == 50304 and fineweb.VOCAB_SIZE % 128 == 0
  assert fineweb.VOCAB_SIZE >= fineweb.GPT2_VOCAB > shards["train1"].max()
  c = run_config(shards["dir"])
  example, vocab, channels = inspect_model.input_spec(c)
  assert example.shape == (CONTEXT,) and vocab == 50304 and channels == 0
  assert tasks.load(c).num_classes == 50304


def test_a_tiny_transformer_trains_on_the_shards(shards, xla_cache, tmp_path):
  c = run_config(shards["dir"])
  task = tasks.load(c)
  group = tmp_path / "run"
  summaries, _ = train.train(c, str(group), seeds=[0, 1], task=task, progress=False)
  for s in summaries:
    assert s["status"] == "ok" and s["steps"] == 3, s
    final = s["final"]
    # Nats per GPT-2 token, near ln(50304) = 10.8 after 3 steps; no bits per byte for tokens.
    assert 0 < final["test_loss"] < 2 * math.log(50304) and math.isfinite(final["train_loss"])
    assert "test_bpb" not in final and "train_bpb" not in final
  assert summaries[0]["final"]["test_loss"] != summaries[1]["final"]["test_loss"]  # two inits
  metrics = (group / "seed0" / "metrics.jsonl").read_text().splitlines()
  lines = [json.loads(line) for line in metrics]
  assert [m["step"] for m in lines if "train_loss" in m] == [1, 2, 3]
  assert [m["step"] for m in lines if "test_loss" in m] == [3]


@pytest.mark.parametrize("experiment", ["value_residual", "preln_postln", "caution_depth"])
def test_the_fineweb_keys_can_be_set_from_the_command_line_at_every_scale(experiment):
  from resjax import main
  path = os.path.join(os.path.dirname(__file__), "..", "experiments", f"{experiment}.py")
  for scale in ("paper", "cpu", "test"):
    config = main.load_experiment(f"{path}:scale={scale}")
    for key, typ in (("name", str), ("data_dir", str), ("val_tokens", int)):
      main.check_override(config, f"data.{key}", path)
      assert config.data.get_type(key) is typ, (scale, key)
