"""Tests for `python -m resjax.main`: one-line user errors, --mode=describe, corrupt checkpoints."""

import concurrent.futures
import json
import os

import pytest

FIG2 = 'experiments/resnetv2_fig2.py'
FIG2_ROWS = ['identity', 'scaling_0_1', 'scaling_0.5_1', 'scaling_0.5_0.5', 'exclusive_gate_bg-5',
             'exclusive_gate_bg-6', 'exclusive_gate_bg-7', 'shortcut_gate_bg0',
             'shortcut_gate_bg-6', 'conv1x1', 'dropout_0.5']
SHORTCUTS = ['conv1x1', 'deepnorm', 'dropout', 'exclusive_gate', 'identity', 'lambda', 'layerscale',
             'mix', 'none', 'rezero', 'scaling', 'shortcut_gate']


def _lines(text):
  return [line for line in text.splitlines() if line.strip()]


# -------------------------------------------------------------------------- user errors

# name -> (arguments of --config, parts of the expected error line). EXPERIMENT and
# EXPERIMENT_CIFAR stand for files the fixture writes, NOT_PREPARED for an empty data dir (also
# TFDS_DATA_DIR in every case).
NOT_PREPARED = '{EMPTY}'
CASES = {
    # The rows of fig2 each set model.shortcut.name; total=0 stops a run that ignored the flag.
    'unknown_shortcut': ([f'{FIG2}:scale=test,run=identity', '--config.model.shortcut.name=nope',
                          '--config.schedule.total=0'], ['nope', *SHORTCUTS]),
    'unknown_shortcut_unset_by_rows': (['EXPERIMENT', '--config.model.shortcut.name=nope'],
                                       ['nope', *SHORTCUTS]),
    'impossible_depth': ([f'{FIG2}:scale=test', '--config.model.depth=111'],
                         ['depth 111', '6n+2', '110']),
    'unknown_arg': ([f'{FIG2}:scale=cpu,colour=red'], ["'colour'", 'scale', 'run', 'seeds']),
    'unknown_scale': ([f'{FIG2}:scale=huge'], ["'huge'", 'paper, cpu, test']),
    'unknown_run': ([f'{FIG2}:scale=test,run=nope'], ["'nope'", ', '.join(FIG2_ROWS)]),
    'not_prepared_data_dir_flag': ([f'{FIG2}:scale=test,run=identity', '--config.data.name=cifar10',
                                    f'--config.data.data_dir={NOT_PREPARED}'],
                                   ['cifar10', 'resjax.data.prepare', NOT_PREPARED]),
    'not_prepared_default_dir': ([f'{FIG2}:scale=test,run=identity', '--config.data.name=cifar10'],
                                 ['cifar10', 'resjax.data.prepare', NOT_PREPARED]),
    'not_prepared_data_dir_in_file': (['EXPERIMENT_CIFAR'],
                                      ['cifar10', 'resjax.data.prepare', NOT_PREPARED]),
    'missing_config_file': (['experiments/no_such_experiment.py:scale=test'],
                            ['no_such_experiment.py']),
}



@pytest.fixture(scope='module')
def user_errors(cli, experiment_file, tmp_path_factory):
  """Runs every case of CASES at once (each stops before training); returns name -> result."""
  root = tmp_path_factory.mktemp('user_errors')
  empty = root / 'empty_data_dir'
  empty.mkdir()
  files = {
      'EXPERIMENT': experiment_file(root / 'rows_keep_shortcut.py', """
          c.runs = [row('plain_row', 'a row that leaves model.shortcut alone')]
          """),
      'EXPERIMENT_CIFAR': experiment_file(root / 'cifar_in_empty_dir.py', f"""
          c.data.update(name='cifar10', data_dir={str(empty)!r})
          c.run = 'identity'
          """),
  }

  def run(name):
    args, _ = CASES[name]
    args = [str(files.get(a, a)).replace(NOT_PREPARED, str(empty)) for a in args]
    workdir = root / name / 'work'
    result = cli.run('--config', *args, '--workdir', workdir,
                     env={'TFDS_DATA_DIR': str(empty)}, timeout=240)
    return result, workdir

  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    results = dict(zip(CASES, pool.map(run, CASES)))
  return results, str(empty)


@pytest.mark.parametrize('name', CASES)
def test_user_error_is_one_clear_line_and_exit_2(user_errors, name):
  results, empty = user_errors
  result, _ = results[name]
  lines = _lines(result.stderr)
  assert result.returncode == 2, result.stderr
  assert 'Traceback' not in result.stderr
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('error: ')
  for part in CASES[name][1]:
    assert part.replace(NOT_PREPARED, empty) in lines[0], part


@pytest.mark.parametrize('name', CASES)
def test_user_error_writes_nothing_to_the_workdir(user_errors, name):
  results, _ = user_errors
  result, workdir = results[name]
  assert result.returncode != 0
  assert not workdir.exists() or os.listdir(workdir) == []


# ---------------------------------------------------------------------- corrupt checkpoint


def _snapshot(directory):
  return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), 'rb').read()
          for d, _, fs in os.walk(directory) for f in fs}


@pytest.fixture(scope='module')
def corrupt_rerun(cli, tmp_path_factory):
  """Trains identity for 3 steps, corrupts every file of its checkpoint, and runs it again."""
  workdir = tmp_path_factory.mktemp('corrupt') / 'work'
  args = ['--config', f'{FIG2}:scale=test,run=identity', '--workdir', workdir,
          '--config.schedule.total=3']
  first = cli.run(*args)
  assert first.returncode == 0, first.stderr
  run_dir = workdir / 'identity' / 'seed0'
  ckpt_dir = workdir / 'identity' / 'ckpt' / 'seeds_0'  # the seeds trained together
  assert os.listdir(ckpt_dir) == ['3']
  step_dir = ckpt_dir / '3'
  os.remove(run_dir / 'summary.json')  # otherwise the finished run is skipped
  for path in _snapshot(step_dir):
    with open(step_dir / path, 'wb') as f:
      f.write(b'\0corrupt\0')
  before = _snapshot(ckpt_dir)
  again = cli.run(*args)
  return again, run_dir, before


def test_corrupt_checkpoint_error_names_it_and_the_fix(corrupt_rerun):
  result, run_dir, before = corrupt_rerun
  assert result.returncode == 2, result.stderr
  assert 'Traceback' not in result.stderr
  (line,) = [line for line in _lines(result.stderr) if line.startswith('error: ')]
  ckpt = str(run_dir.parent / 'ckpt' / 'seeds_0')
  assert f'checkpoint {ckpt}/3 cannot be restored' in line
  assert f'delete {ckpt} to restart this run from scratch' in line
  assert 'another --workdir' in line
  # Nothing deleted, repaired or added behind the user's back, and no summary claims a result.
  assert _snapshot(run_dir.parent / 'ckpt' / 'seeds_0') == before
  assert not (run_dir / 'summary.json').exists()


def test_corrupt_checkpoint_error_is_the_only_line(corrupt_rerun):
  result, _, _ = corrupt_rerun
  assert len(_lines(result.stderr)) == 1, result.stderr


# ---------------------------------------------------------------------------- describe


@pytest.fixture(scope='module', autouse=True)
def describe_run(cli, tmp_path_factory):
  """Starts `--mode=describe` with the module: its 22 compilations overlap the tests above."""
  root = tmp_path_factory.mktemp('describe')
  with cli.background(root, '--config', f'{FIG2}:scale=test', '--workdir', root / 'work',
                      '--mode=describe') as proc:
    yield proc, root


def test_describe_prints_every_row_and_trains_nothing(describe_run):
  proc, root = describe_run
  assert proc.wait(timeout=400) == 0, (root / 'err').read_text()
  rows = json.loads((root / 'out').read_text())
  assert [r['run'] for r in rows] == FIG2_ROWS
  for r in rows:
    assert isinstance(r['params'], int) and r['params'] > 0
    assert r['forward_flops_per_example'] > 0
    assert r['model']['depth'] == 14
  assert not (root / 'work').exists()
  by_name = {r['run']: r for r in rows}
  identity = by_name['identity']
  # ResNet-14: 3 stages of 2 units at widths 16, 32, 64. Option B projects (1x1 conv + BN) only
  # where the shape changes: the first unit of stages 2 and 3. conv1x1 projects on the other 4.
  unprojected = [16, 16, 32, 64]
  projections = sum(c * c + 2 * c for c in unprojected)
  assert by_name['conv1x1']['params'] - identity['params'] == projections
  assert by_name['conv1x1']['forward_flops_per_example'] > identity['forward_flops_per_example']
  # Constant scaling and dropout add no parameters; a gate is a 1x1 conv with bias on every unit.
  for name in ('scaling_0_1', 'scaling_0.5_1', 'scaling_0.5_0.5', 'dropout_0.5'):
    assert by_name[name]['params'] == identity['params'], name
  gates = [(16, 16), (16, 16), (16, 32), (32, 32), (32, 64), (64, 64)]
  for name in ('exclusive_gate_bg-5', 'exclusive_gate_bg-6', 'shortcut_gate_bg0'):
    assert by_name[name]['params'] - identity['params'] == sum(i * o + o for i, o in gates), name
