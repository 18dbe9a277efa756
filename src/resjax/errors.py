"""Errors a user can cause. Each is reported as one line naming the fix, with a non-zero exit."""

import contextlib

from absl import logging


class UserError(Exception):
  """A problem with the user's input: config, data, workdir. Its message names the fix."""


class DatasetNotPrepared(UserError):
  """A dataset is not on disk yet. ``offline``: the change that runs without it ("set
  config.data.name=digits"), kept apart from ``message`` so that a command with its own way to run
  offline (``python -m resjax.caution --scale cpu``) can name that one instead."""

  def __init__(self, message: str, offline: str | None = None):
    self.message, self.offline = message, offline
    super().__init__(message + (f", or {offline} to run offline" if offline else ""))


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
