"""`python -m iterdpo_reward_server [flags]`: the reward server."""

import sys

from iterdpo_reward_server.cli import main

sys.exit(main())
