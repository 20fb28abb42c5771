"""Stage program."""
