"""Fixtures shared by the tests that train: the CLI as a subprocess, one XLA cache per session."""

import contextlib
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
FIG2 = REPO / 'experiments' / 'resnetv2_fig2.py'


@pytest.fixture(scope='session')
def compile_cache_dir(tmp_path_factory):
  """A persistent XLA cache: runs of the same config compile their step once per session."""
  return tmp_path_factory.mktemp('xla_cache')


class Cli:
  """`python -m resjax.main ...` from the repo root, sharing the session's XLA cache."""

  def __init__(self, cache_dir):
    self.env = {**os.environ, 'JAX_COMPILATION_CACHE_DIR': str(cache_dir),
                'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}

  def argv(self, *args):
    return [sys.executable, '-m', 'resjax.main', *map(str, args)]

  def run(self, *args, env=None, timeout=300):
    return subprocess.run(self.argv(*args), cwd=REPO, env={**self.env, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)

  def popen(self, *args, stdout, stderr):
    return subprocess.Popen(self.argv(*args), cwd=REPO, env=self.env, stdout=stdout,
                            stderr=stderr, text=True)

  @contextlib.contextmanager
  def background(self, root, *args):
    """Runs the CLI in the background with stdout/stderr in root/out, root/err; kills it on exit."""
    with open(root / 'out', 'w') as out, open(root / 'err', 'w') as err:
      proc = self.popen(*args, stdout=out, stderr=err)
      try:
        yield proc
      finally:
        if proc.poll() is None:
          proc.kill()
          proc.wait()


@pytest.fixture(scope='session')
def cli(compile_cache_dir):
  return Cli(compile_cache_dir)


def write_experiment(path, body):
  """Writes an experiment file whose get_config takes fig2 at scale=test as `c` and runs `body`."""
  head = textwrap.dedent(f"""\
      import importlib.util
      from resjax.configs import row

      _spec = importlib.util.spec_from_file_location('resnetv2_fig2', {str(FIG2)!r})
      _fig2 = importlib.util.module_from_spec(_spec)
      _spec.loader.exec_module(_fig2)


      def get_config(arg=None):
        c = _fig2.get_config('scale=test')
      """)
  path.write_text(head + textwrap.indent(textwrap.dedent(body).strip(), '  ') + '\n  return c\n')
  return path


@pytest.fixture(scope='session')
def experiment_file():
  return write_experiment
