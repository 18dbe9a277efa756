"""python -m resjax.kernels build [--optional] | status"""

import argparse
import sys

from resjax import kernels


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m resjax.kernels",
                              description=kernels.__doc__.splitlines()[0])
  p.add_argument("command", choices=("build", "status"))
  p.add_argument("-v", "--verbose", action="store_true", help="print the compiler's command line")
  p.add_argument("--optional", action="store_true",
                 help="build: where oneDNN's wheels are not installed (not x86-64 Linux), say so "
                      "and exit 0; CPU convolutions stay the matrix multiplies")
  args = p.parse_args(argv)
  try:
    if args.command == "build" and args.optional and not kernels.wheels_installed():
      print(f"oneDNN's wheels are not installed here ({', '.join(kernels.ONEDNN)}): CPU "
            f"convolutions stay matrix multiplies")
      return 0
    building = args.command == "build"
    path = kernels.build(verbose=args.verbose) if building else kernels.library_path()
    kernels.require()
    cache = kernels.blockcache_path()
    print(f"{'built ' if building else ''}{path} (oneDNN {kernels.onednn_version()}); "
          f"block cache: {cache if cache.exists() else 'not built'}")
  except kernels.NotBuilt as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
