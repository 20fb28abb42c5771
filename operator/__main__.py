"""python -m iterdpo_operator: the same as `iterdpo operator`."""

import sys

from iterdpo.cli import main

sys.exit(main(["operator", *sys.argv[1:]]))
