import sys

from iterdpo_evaluator.evaluate import main

if __name__ == "__main__":  # vLLM spawns workers: the guard is required
    sys.exit(main())
