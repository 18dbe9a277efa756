"""python -m resjax.kernels build | status"""

import argparse
import sys

from resjax import kernels


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m resjax.kernels", description=kernels.__doc__.splitlines()[0])
  p.add_argument("command", choices=("build", "status"))
  p.add_argument("-v", "--verbose", action="store_true", help="print the compiler's command line")
  args = p.parse_args(argv)
  try:
    if args.command == "build":
      path = kernels.build(verbose=args.verbose)
      kernels.require()
      print(f"built {path} (oneDNN {kernels.onednn_version()})")
    else:
      kernels.require()
      print(f"{kernels.library_path()} (oneDNN {kernels.onednn_version()})")
  except kernels.NotBuilt as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
