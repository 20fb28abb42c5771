"""docs/run-file.md is generated from the spec model and must not drift from it."""

from pathlib import Path

from iterdpo.spec import IterativeDPORunSpec
from iterdpo.specdoc import field_rows, render

DOC = Path(__file__).resolve().parents[2] / "docs" / "run-file.md"


def test_committed_reference_matches_the_model():
    assert DOC.read_text() == render(), "regenerate: python -m iterdpo.specdoc > docs/run-file.md"


def test_every_field_is_described():
    undocumented = [path for path, _, _, description in field_rows(IterativeDPORunSpec) if not description]
    assert undocumented == []


def test_rows_show_bounds_defaults_and_allowed_values():
    rows = {path: (kind, default) for path, kind, default, _ in field_rows(IterativeDPORunSpec)}
    assert rows["spec.generation.samplesPerPrompt"] == ("int (>= 2, <= 1024)", "`8`")
    assert rows["spec.prompts.perIteration[].maxPrompts"] == ("int (>= 1, <= 2147483648)", "unset")
    assert rows["spec.pairing.strategy"][0].startswith("one of `max_min`, `max_random`")
    assert rows["spec.policy.model"] == ("str", "required")
    assert rows["spec.reward.model"] == ("str", "unset")
