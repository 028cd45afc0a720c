import sys

from ppo_lm.cli import main

sys.exit(main())
