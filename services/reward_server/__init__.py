"""iterdpo's Score stage: a reward-model HTTP server and the annotator that calls it.

- `main(argv)`: the server (`iterdpo serve-reward`, `python -m iterdpo_reward_server`).
- `annotate_main(argv)`: score a round's generations and pair them (`iterdpo annotate`).

Imports are deferred so that importing the package stays cheap (no torch).
"""


def main(argv: list[str] | None = None) -> int:
    from iterdpo_reward_server.cli import main as serve

    return serve(argv)


def annotate_main(argv: list[str] | None = None) -> int:
    from iterdpo_reward_server.annotate import annotate_main as annotate

    return annotate(argv)
