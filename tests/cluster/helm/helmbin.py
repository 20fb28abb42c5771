"""Where the helm that build.sh builds is, for the tests (tests/unit/test_chart.py,
tests/cluster/test_chart_install.py). Like tests/cluster/conftest.py's _cached_bin_dir, it
never starts a build by surprise: it uses $ITERDPO_HELM, else build.sh's cache when the
stamp matches (or when ITERDPO_BUILD_CLUSTER=1 asks for a build)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULE = "helm.sh/helm/v3"
WHY_MISSING = "helm not built: run tests/cluster/helm/build.sh (about 3 min cold) or set ITERDPO_HELM"


def _version() -> str:
    for line in (HERE / "go.mod").read_text().splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == MODULE and words[1].startswith("v"):
            return words[1]
    raise RuntimeError(f"no {MODULE} version in {HERE / 'go.mod'}")


def cached_bin_dir() -> Path | None:
    """build.sh's folder if it holds a helm built from the current go.mod/go.sum."""
    root = Path(os.environ.get("ITERDPO_CLUSTER_CACHE", Path.home() / ".cache" / "iterdpo-cluster"))
    dest = root / f"helm-{_version()}"
    stamp = hashlib.sha256((HERE / "go.mod").read_bytes() + (HERE / "go.sum").read_bytes()).hexdigest()[:16]
    try:
        if (dest / "stamp").read_text().strip() != stamp:
            return None
    except FileNotFoundError:
        return None
    return dest / "bin" if os.access(dest / "bin" / "helm", os.X_OK) else None


def helm_path() -> Path | None:
    """The helm binary, or None (the caller skips with WHY_MISSING)."""
    if os.environ.get("ITERDPO_HELM"):
        return Path(os.environ["ITERDPO_HELM"])
    if os.environ.get("ITERDPO_BUILD_CLUSTER") == "1" or cached_bin_dir() is not None:
        out = subprocess.run([str(HERE / "build.sh")], check=True, stdout=subprocess.PIPE, text=True)
        return Path(out.stdout.strip().splitlines()[-1]) / "helm"
    return None
