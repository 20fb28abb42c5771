"""Stage program: the Evaluate stage (vLLM on held-out prompts, scored through the reward servers)."""
