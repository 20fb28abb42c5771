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


def pytest_collection_modifyitems(session, config, items) -> None:
    """Run tests/cluster last. Its control plane (kube-apiserver, etcd, controller-manager) is a
    session fixture, torn down only when the session ends: run first, it kept ~0.7 of CI's 2
    cores busy through every component and end-to-end test. Otherwise the order is unchanged."""
    cluster = Path(__file__).resolve().parent / "cluster"
    items.sort(key=lambda item: Path(str(item.path)).is_relative_to(cluster))
