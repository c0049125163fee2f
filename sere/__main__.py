"""`python -m sere <command> ...`: the same as the `sere` command (see sere.cli)."""

import sys

from sere.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m sere"))
