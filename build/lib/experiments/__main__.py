"""`python -m experiments [COMMAND] [key=value ...]` — see `python -m experiments --help`."""

import sys

from experiments.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
