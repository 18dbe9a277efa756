"""``python -m resjax.bench``: see ``resjax.bench.cli``."""

import sys

from resjax.bench import cli

sys.exit(cli.cli())
