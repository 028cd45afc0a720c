"""`python main.py [--FIELD VALUE ...]`: the demo, exactly as `ppo-lm demo` (see ppo_lm/demo.py)."""

import sys

from ppo_lm.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
