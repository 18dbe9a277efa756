"""Errors a user can cause. Each is reported as one line naming the fix, with a non-zero exit."""

import contextlib

from absl import logging


class UserError(Exception):
  """A problem with the user's input: config, data, workdir. Its message names the fix."""


class DatasetNotPrepared(UserError):
  """A TFDS dataset is not on disk yet."""


class ConfigError(UserError):
  """A config value that cannot work (unknown name, impossible depth, ...)."""


class CheckpointError(UserError):
  """A checkpoint in the workdir that cannot be restored."""


@contextlib.contextmanager
def quiet_logs():
  """Silences absl logging (TFDS, orbax) where resjax reports a failure in its own one line."""
  level = logging.get_verbosity()
  logging.set_verbosity(logging.FATAL)
  try:
    yield
  finally:
    logging.set_verbosity(level)
