"""Prepares a TFDS image dataset as ArrayRecord files, the format `load_images` reads.

  python -m resjax.data.prepare --dataset cifar10 [--data_dir DIR] [--archive PATH]

Only this step needs TensorFlow (the TFDS builders parse the original files with it);
training reads the result without it. `--archive` builds from a local copy of the dataset's
original download (e.g. cifar-10-binary.tar.gz) instead of fetching it, for machines
without network.

TFDS generates into a temporary `incomplete.*` folder and renames it to `<name>/<version>`
only on success, so an interrupted or failed run never looks prepared to `load_images`.
"""

import argparse
import hashlib
import os
import sys
import tempfile

from resjax.errors import UserError

DATASETS = ('cifar10', 'cifar100')


def missing_tensorflow_message() -> str:
  """The one line shown when the `prepare` extra is not installed."""
  return "preparing datasets needs TensorFlow: pip install 'resjax[prepare]'"


def require_tensorflow() -> None:
  """Imports TensorFlow, or raises `UserError` naming the extra to install."""
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ModuleNotFoundError as e:
    # Only an absent TensorFlow is fixed by installing the extra; a broken install keeps its error.
    if (e.name or '').split('.')[0] != 'tensorflow':
      raise
    raise UserError(missing_tensorflow_message()) from None


def _resources_backport_fallback() -> None:
  """Lets TFDS builders run where the `importlib_resources` backport is not installed.

  TFDS's builder code (`code_path`, reached by every `download_and_prepare`) imports the
  backport, but TFDS only requires it on Python < 3.9, so on newer Pythons a clean install
  fails with ModuleNotFoundError. The standard library's `importlib.resources` (Python >= 3.11, as
  resjax requires) has the `abc.Traversable` that code checks, so it stands in. This runs
  only in the preparing process.
  """
  try:
    import importlib_resources  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ModuleNotFoundError:
    import importlib.resources.abc  # pylint: disable=g-import-not-at-top
    sys.modules['importlib_resources'] = importlib.resources


def prepare(name: str, data_dir: str | None = None, archive: str | None = None) -> str:
  """Builds `name` as array_record into `data_dir` (TFDS's default if None); returns that dir."""
  if name not in DATASETS:
    raise UserError(f'cannot prepare {name!r}: use --dataset with one of {", ".join(DATASETS)}')
  if archive is not None:
    archive = os.path.abspath(os.path.expanduser(archive))
    if not os.path.isfile(archive):
      raise UserError(f'--archive {archive} is not a file: pass the path of the downloaded archive')
  if data_dir:
    # Absolute, so the printed config override works from any working directory.
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
  require_tensorflow()
  _resources_backport_fallback()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(name, data_dir=data_dir)
  root = os.fspath(builder.data_dir_root)
  if builder.is_prepared():
    formats = builder.info.available_file_formats()
    if tfds.core.FileFormat.ARRAY_RECORD not in formats:
      raise UserError(f'{name} in {root} is prepared as {sorted(f.value for f in formats)}, '
                      'without array_record: pass a new --data_dir to prepare it there')
    print(f'{name} is already prepared in {builder.data_dir}')
    _print_usage(name, root)
    return root

  # No GCS lookup: TFDS would use a hosted copy only for tfrecord, and the lookup needs network.
  config = tfds.download.DownloadConfig(try_download_gcs=False)
  if archive is None:
    builder.download_and_prepare(file_format='array_record', download_config=config)
  else:
    url, expected = _single_download(builder)
    _check_archive(archive, url, expected)
    local = _archive_builder_class(type(builder), url, archive)(data_dir=data_dir)
    os.makedirs(root, exist_ok=True)
    # Unpack into a throwaway folder: a stale unpacking of another file with the same name is
    # never reused, and ~180 MB of extracted files do not linger.
    with tempfile.TemporaryDirectory(prefix='resjax-extract-', dir=root) as extract_dir:
      local.download_and_prepare(file_format='array_record',
                                 download_config=config.replace(extract_dir=extract_dir))
  print(f'{name} is prepared in {builder.data_dir}')
  _print_usage(name, root)
  return root


def _print_usage(name, root):
  print(f'use it with: --config.data.name={name} --config.data.data_dir={root}')


def _single_download(builder):
  """The (url, recorded UrlInfo) of a builder that downloads exactly one file."""
  infos = builder.url_infos or {}
  if len(infos) != 1:
    raise UserError(f'--archive needs a dataset with exactly one download, and {builder.name} '
                    f'has {len(infos)}: prepare it without --archive')
  return next(iter(infos.items()))


def _check_archive(archive, url, expected):
  """Compares the archive with the size and sha256 TFDS records for `url`, and says which."""
  digest, size = hashlib.sha256(), 0
  with open(archive, 'rb') as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
      size += len(chunk)
  checksum = digest.hexdigest()
  if size == int(expected.size) and checksum == expected.checksum:
    print(f'{archive}: size and sha256 match the published {url}')
    return
  # A user-supplied archive is taken as is (tests, a re-packed copy), but never silently.
  print(f'WARNING: {archive} (sha256 {checksum}, {size} bytes) is not the published {url} '
        f'(sha256 {expected.checksum}, {int(expected.size)} bytes): using it anyway, so the '
        "TFDS checksum check is SKIPPED for this user-supplied file", file=sys.stderr)


class _ArchiveDownloads:
  """Download manager stand-in: serves the builder's one URL from a local archive."""

  def __init__(self, dl_manager, url, archive):
    self._dl_manager = dl_manager
    self._url = url
    self._archive = archive

  def _check(self, url):
    if url != self._url:
      raise RuntimeError(
          f'the builder asked for {url!r}, but --archive stands in for {self._url!r}')

  def download(self, url):
    from etils import epath  # pylint: disable=g-import-not-at-top
    self._check(url)
    return epath.Path(self._archive)

  def download_and_extract(self, url):
    self._check(url)
    # `extract` is the manager's own unpacking (tar/zip/gz by file name), with no checksum step.
    return self._dl_manager.extract(self.download(url))

  def __getattr__(self, attr):
    return getattr(self._dl_manager, attr)


def _archive_builder_class(cls, url, archive):
  """`cls`, with its one download served from `archive` instead of fetched from `url`."""

  class FromArchive(cls, skip_registration=True):
    # Same name and module as `cls`: the folder and dataset_info.json it writes are the ones a
    # normal download writes, so the result reads back through the registered `cls`.
    name = cls.name
    __module__ = cls.__module__

    def _split_generators(self, dl_manager, **kwargs):
      return super()._split_generators(_ArchiveDownloads(dl_manager, url, archive), **kwargs)

  return FromArchive


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='resjax-prepare', description='Prepare a TFDS image dataset (array_record) for resjax.')
  parser.add_argument('--dataset', required=True, choices=DATASETS)
  parser.add_argument('--data_dir', default=None,
                      help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument('--archive', default=None,
                      help="local copy of the dataset's original download, used instead of "
                      'fetching it')
  args = parser.parse_args(argv)
  prepare(args.dataset, data_dir=args.data_dir, archive=args.archive)
  return 0


def run() -> None:
  """Console-script entry point (`resjax-prepare`): user errors become one line and exit 1."""
  try:
    sys.exit(main())
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  run()
