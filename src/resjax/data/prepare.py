"""Prepares TFDS datasets as ArrayRecord files, the format resjax reads by random access.

  python -m resjax.data.prepare --dataset cifar10 [--data_dir DIR] [--archive PATH]
  python -m resjax.data.prepare --dataset tiny_shakespeare|lm1b [--data_dir DIR] [--archive PATH]
  python -m resjax.data.prepare --dataset imagenet2012 --manual_dir DIR [--data_dir DIR]

Only this step needs TensorFlow (the TFDS builders parse the original files with it);
training reads the result without it. `--archive` builds from a local copy of the dataset's
original download (e.g. cifar-10-binary.tar.gz) instead of fetching it, for machines
without network. ImageNet cannot be fetched: download ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar from https://image-net.org/download-images (registration needed) into
one folder and pass it as `--manual_dir`; the archives are about 150 GB, and building
writes about as much again and takes hours.

TFDS generates into a temporary `incomplete.*` folder and renames it to `<name>/<version>`
only on success, so an interrupted or failed run never looks prepared to the readers.
`open_data_source` is the readers' side: it opens a prepared dataset, or raises
`DatasetNotPrepared` with the one line that prepares it.
"""

import argparse
import hashlib
import os
import sys
import tempfile

from resjax.errors import DatasetNotPrepared, UserError

DATASETS = ("cifar10", "cifar100", "tiny_shakespeare", "lm1b", "imagenet2012")
# Datasets that TFDS cannot download: the files their builder reads from --manual_dir.
MANUAL_FILES = {"imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")}
MANUAL_SOURCES = {"imagenet2012": "https://image-net.org/download-images (registration needed)"}


def missing_tensorflow_message() -> str:
  """The one line shown when the `prepare` extra is not installed."""
  return "preparing datasets needs TensorFlow: pip install 'resjax[prepare]'"


def require_tensorflow() -> None:
  """Imports TensorFlow, or raises `UserError` naming the extra to install."""
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ModuleNotFoundError as e:
    # Only an absent TensorFlow is fixed by installing the extra; a broken install keeps its error.
    if (e.name or "").split(".")[0] != "tensorflow":
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
    sys.modules["importlib_resources"] = importlib.resources


def prepare(name: str, data_dir: str | None = None, archive: str | None = None,
            manual_dir: str | None = None) -> str:
  """Builds `name` as array_record into `data_dir` (TFDS's default if None); returns that dir."""
  if name not in DATASETS:
    raise UserError(f'cannot prepare {name!r}: use --dataset with one of {", ".join(DATASETS)}')
  # Argument mistakes are reported before anything is imported or written.
  if name in MANUAL_FILES:
    if archive is not None:
      raise UserError(f'--archive does not apply to {name}: pass the folder holding '
                      f'{" and ".join(MANUAL_FILES[name])} as --manual_dir')
    manual_dir = check_manual_dir(name, manual_dir)
  elif manual_dir is not None:
    raise UserError(f'--manual_dir is only for {", ".join(MANUAL_FILES)}; {name} is downloaded '
                    'by TFDS (or built from --archive): drop --manual_dir')
  if archive is not None:
    archive = os.path.abspath(os.path.expanduser(archive))
    if not os.path.isfile(archive):
      raise UserError(f"--archive {archive} is not a file: pass the path of the downloaded archive")
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
      raise UserError(f"{name} in {root} is prepared as {sorted(f.value for f in formats)}, "
                      "without array_record: pass a new --data_dir to prepare it there")
    print(f"{name} is already prepared in {builder.data_dir}")
    _print_usage(name, root)
    return root

  # No GCS lookup: TFDS would use a hosted copy only for tfrecord, and the lookup needs network.
  config = tfds.download.DownloadConfig(try_download_gcs=False, manual_dir=manual_dir)
  if archive is None:
    builder.download_and_prepare(file_format="array_record", download_config=config)
  else:
    url, expected = _single_download(builder)
    _check_archive(archive, url, expected)
    local = _archive_builder_class(type(builder), url, archive)(data_dir=data_dir)
    os.makedirs(root, exist_ok=True)
    # Unpack into a throwaway folder: a stale unpacking of another file with the same name is
    # never reused, and ~180 MB of extracted files do not linger.
    with tempfile.TemporaryDirectory(prefix="resjax-extract-", dir=root) as extract_dir:
      local.download_and_prepare(file_format="array_record",
                                 download_config=config.replace(extract_dir=extract_dir))
  print(f"{name} is prepared in {builder.data_dir}")
  _print_usage(name, root)
  return root


def prepare_command(name: str, data_dir: str) -> str:
  """The shell command that prepares `name` into `data_dir`."""
  manual = " --manual_dir MANUAL_DIR" if name in MANUAL_FILES else ""
  return f"python -m resjax.data.prepare --dataset {name}{manual} --data_dir {data_dir}"


def not_prepared_message(name: str, root: str) -> str:
  """The one line telling the user how to prepare `name` in the TFDS data dir `root`."""
  fetch = ""
  if name in MANUAL_FILES:
    fetch = (f'download {" and ".join(MANUAL_FILES[name])} from {MANUAL_SOURCES[name]} into a '
             'folder MANUAL_DIR, then ')
  return (f"{name} is not prepared in {root}: {fetch}run '{prepare_command(name, root)}' "
          f"(needs: pip install 'resjax[prepare]')")


def open_data_source(name: str, split, data_dir: str | None, *, offline_name: str | None = None,
                     decoders=None):
  """`tfds.data_source(name, split)` of a prepared dataset, read without TensorFlow.

  Never downloads or builds; a dataset that is not prepared, or was prepared without random
  access, raises `DatasetNotPrepared` with the one line that fixes it (`offline_name`, if
  given, is named as the offline alternative).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                            decoders=decoders)
  except (NotImplementedError, KeyError):
    # TFDS reports a missing dataset as "file format tfrecord has no random access" (an
    # unprepared builder defaults to tfrecord) or, in its default data dir, as a KeyError for an
    # empty split list; tell these apart from a dataset prepared without random access.
    builder = tfds.builder(name, data_dir=data_dir)
    root = os.fspath(builder.data_dir_root)
    if not builder.is_prepared():
      offline = f"set config.data.name={offline_name}" if offline_name else None
      raise DatasetNotPrepared(not_prepared_message(name, root), offline=offline) from None
    formats = builder.info.available_file_formats()
    if formats & set(tfds.core.FileFormat.with_random_access()):
      raise  # Readable files are there, so the error is not about preparation.
    raise DatasetNotPrepared(
        f"{name} in {root} was prepared as {sorted(f.value for f in formats)}, without random "
        f"access: run '{prepare_command(name, 'NEW_DIR')}' with a new directory (it writes "
        "array_record)") from None


def check_manual_dir(name: str, manual_dir: str | None) -> str:
  """The absolute `manual_dir`, or `UserError` naming the files it must hold."""
  files = " and ".join(MANUAL_FILES[name])
  if manual_dir is None:
    raise UserError(f"{name} is a manual download: put {files} from {MANUAL_SOURCES[name]} in one "
                    "folder and pass it as --manual_dir")
  manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  missing = [f for f in MANUAL_FILES[name] if not os.path.isfile(os.path.join(manual_dir, f))]
  if missing:
    raise UserError(f'--manual_dir {manual_dir} lacks {" and ".join(missing)}: download '
                    f'{files} from {MANUAL_SOURCES[name]} into it')
  return manual_dir


def _print_usage(name, root):
  print(f"use it with: --config.data.name={name} --config.data.data_dir={root}")


def _single_download(builder):
  """The (url, recorded UrlInfo) of a builder that downloads exactly one file."""
  infos = builder.url_infos or {}
  if len(infos) != 1:
    raise UserError(f"--archive needs a dataset with exactly one download, and {builder.name} "
                    f"has {len(infos)}: prepare it without --archive")
  return next(iter(infos.items()))


def _check_archive(archive, url, expected):
  """Compares the archive with the size and sha256 TFDS records for `url`, and says which."""
  digest, size = hashlib.sha256(), 0
  with open(archive, "rb") as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
      size += len(chunk)
  checksum = digest.hexdigest()
  if size == int(expected.size) and checksum == expected.checksum:
    print(f"{archive}: size and sha256 match the published {url}")
    return
  # A user-supplied archive is taken as is (tests, a re-packed copy), but never silently.
  print(f"WARNING: {archive} (sha256 {checksum}, {size} bytes) is not the published {url} "
        f"(sha256 {expected.checksum}, {int(expected.size)} bytes): using it anyway, so the "
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
          f"the builder asked for {url!r}, but --archive stands in for {self._url!r}")

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
      prog="resjax-prepare", description="Prepare a TFDS dataset (array_record) for resjax.")
  parser.add_argument("--dataset", required=True, choices=DATASETS)
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--archive", default=None,
                      help="local copy of the dataset's original download, used instead of "
                      "fetching it")
  parser.add_argument("--manual_dir", default=None,
                      help='folder holding the files of a manual download (imagenet2012: '
                      f'{" and ".join(MANUAL_FILES["imagenet2012"])})')
  args = parser.parse_args(argv)
  prepare(args.dataset, data_dir=args.data_dir, archive=args.archive, manual_dir=args.manual_dir)
  return 0


def run() -> None:
  """Console-script entry point (`resjax-prepare`): user errors become one line and exit 1."""
  try:
    sys.exit(main())
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  run()
