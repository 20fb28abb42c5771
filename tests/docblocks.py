"""The shell commands the docs show, read the way a newcomer copies them.

A fenced ```sh (or bash) block is preceded by a marker comment:
  <!-- run: FLOW -->         tests/cluster/test_docs_walkthrough.py runs the block literally,
                             with the other blocks of FLOW, in document order;
  <!-- not run: REASON -->   it is not run, and REASON says why (no docker, no kubelet API, ...).
tests/unit/test_docs_commands.py checks that every block with a kubectl, helm or iterdpo command
is marked, and that every command that acts in a namespace names it (-n), so a copied command
never lands in `default`.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "charts" / "iterdpo" / "README.md"]
MARKER = re.compile(r"^<!--\s*(run|not run):\s*(.+?)\s*-->$")
FENCE = re.compile(r"^```(\w*)\s*$")
TOOLS = ("kubectl", "helm", "iterdpo", ".venv/bin/iterdpo")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence
    lang: str
    marker: tuple[str, str] | None  # ("run", flow) or ("not run", reason)
    text: str

    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, each with the marker just above it."""
    out, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        above = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(above)
        out.append(Block(path, start + 1, m.group(1), marker.groups() if marker else None, "\n".join(body) + "\n"))
        i += 1
    return out


def commands(script: str) -> list[str]:
    """The simple commands of a shell snippet: continuations joined, comments, heredoc
    bodies and the output lines of an example (not starting with a tool) dropped."""
    joined, heredoc = [], None
    for raw in script.replace("\\\n", " ").splitlines():
        if heredoc is not None:
            if raw.strip() == heredoc:
                heredoc = None
            continue
        if m := re.search(r"<<-?\s*'?(\w+)'?", raw):
            heredoc = m.group(1)
        joined.append(raw.split(" #")[0] if not raw.lstrip().startswith("#") else "")
    out = []
    for line in joined:
        for part in re.split(r"&&|\|\||;|\|", line):
            part = part.strip()
            if part.startswith(TOOLS):
                out.append(part)
    return out


def inline_commands(path: Path) -> list[tuple[int, str]]:
    """`kubectl ...`, `helm ...` and `iterdpo ...` in running text (outside code blocks)."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            # a command, not a mention of one (`kubectl apply`, `helm install/upgrade/uninstall`)
            out += [(number, c) for c in re.findall(r"`([^`]+)`", line) if c.startswith(TOOLS[:3]) and len(c.split()) >= 3]
    return out


CLUSTER_SCOPED = re.compile(r"\b(crds?/|crd\b|customresourcedefinition|namespace\b|namespaces\b|ns\b|clusterroles?\b|nodes?\b)")


def needs_namespace(command: str) -> bool:
    """Whether the command acts in a namespace, and so must say which (-n NS or -A)."""
    words = shlex.split(command, comments=True)
    tool, rest = Path(words[0]).name, words[1:]
    sub = rest[0] if rest else ""
    if tool == "kubectl":
        if sub in ("version", "config", "api-resources", "explain", "cluster-info", "auth") or CLUSTER_SCOPED.search(command):
            return False
        return sub not in ("create",) or not (len(rest) > 1 and rest[1] == "namespace")
    if tool == "helm":
        return sub in ("install", "upgrade", "uninstall", "status", "rollback", "history", "get")
    if tool == "iterdpo":
        return sub in ("resume", "render") or (sub == "status" and "--cluster" in words)
    return False


def names_namespace(command: str) -> bool:
    words = [w.strip("[]") for w in shlex.split(command, comments=True)]
    return any(w in ("-n", "--namespace", "-A", "--all-namespaces") or w.startswith(("-n=", "--namespace=")) for w in words)


def walkthrough(flow: str) -> tuple[str, list[Block]]:
    """The blocks marked `run: FLOW`, in document order, as one script."""
    chosen = [b for path in DOCS for b in blocks(path) if b.marker == ("run", flow)]
    return "".join(f"# --- {b.where()}\n{b.text}" for b in chosen), chosen
