"""The docs' shell commands: every block that drives a cluster is marked (run by the
walkthrough test, or not run and why), and every command says its namespace."""

from __future__ import annotations

import pytest
from docblocks import DOCS, TOOLS, blocks, commands, inline_commands, names_namespace, needs_namespace, walkthrough

SHELL = ("sh", "bash", "shell", "console")


def all_blocks():
    return [b for path in DOCS for b in blocks(path) if b.lang in SHELL]


def test_every_cluster_command_block_is_marked():
    unmarked = [b.where() for b in all_blocks() if commands(b.text) and b.marker is None]
    assert not unmarked, f"mark these blocks <!-- run: FLOW --> or <!-- not run: why --> (tests/docblocks.py): {unmarked}"


def test_every_namespaced_command_names_its_namespace():
    missing = [f"{b.where()}: {c}" for b in all_blocks() for c in commands(b.text) if needs_namespace(c) and not names_namespace(c)]
    missing += [f"{path.name}:{line}: {c}" for path in DOCS for line, c in inline_commands(path)
                if needs_namespace(c) and not names_namespace(c)]  # fmt: skip
    assert not missing, "add -n NAMESPACE (or -A):\n" + "\n".join(missing)


@pytest.mark.parametrize("flow", ["install", "quickstart"])
def test_each_walkthrough_exists_in_order(flow):
    script, chosen = walkthrough(flow)
    assert chosen and "helm install" in script and "helm uninstall" in script


def test_every_helm_install_shown_is_one_a_walkthrough_runs():
    """The one-liners elsewhere (README, kubernetes.md) are copies of a tested command."""
    tested = {c for flow in ("install", "quickstart") for c in commands(walkthrough(flow)[0]) if c.startswith("helm install")}
    shown = {c for b in all_blocks() for c in commands(b.text) if c.startswith("helm install")}
    shown |= {c for path in DOCS for _, c in inline_commands(path) if c.startswith("helm install")}
    assert shown <= tested, f"untested helm install lines: {sorted(shown - tested)}"


def test_the_parser_reads_continuations_heredocs_and_comments():
    script = "kubectl apply -f - <<EOF   # x\n{\"a\": 1}\nEOF\nhelm install r c \\\n  -n ns  # note\necho hi && iterdpo status r --cluster\n"
    assert commands(script) == ["kubectl apply -f - <<EOF", "helm install r c    -n ns", "iterdpo status r --cluster"]
    assert needs_namespace("kubectl apply -f x.yaml") and not needs_namespace("kubectl apply --server-side -f crds/")
    assert not needs_namespace("kubectl create namespace ml") and needs_namespace("iterdpo status r --cluster")
    assert TOOLS[0] == "kubectl"
