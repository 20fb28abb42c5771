"""Shared fixtures: the tiny models every component and end-to-end test uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from iterdpo.tiny import TinyAssets


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyAssets:
    """Tiny policy, reward model and prompt sets, built once per test session (no downloads)."""
    from iterdpo.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture()
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
