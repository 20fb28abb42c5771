"""`python -m iterdpo_trainer` / `torchrun ... -m iterdpo_trainer`: see iterdpo_trainer.cli."""

import sys

from iterdpo_trainer.cli import main

sys.exit(main())
