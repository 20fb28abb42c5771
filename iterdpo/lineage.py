"""Lineage: content digests of what each stage process read and wrote.

Every stage program digests its inputs before it starts (`open_ledger`) and its outputs once
they are in place (`Ledger.close`). The record goes two ways: into the process's summary
(so `status.iterations[].lineage` traces a round on both backends) and into a small ledger
file next to the stage's outputs, `iter-NN/<stage folder>/lineage-<process>.json`. A later
process (a resumed run, the next round, a retried shard) that reads a path some ledger
already holds under another digest is refused, naming the path and both digests: a changed
input under the same name is refused, as a changed spec is.

A digest is `sha256:<hex>` of a file, or of a folder (each file's path relative to it and
its sha256, in sorted order; names starting with "." are skipped: temporaries, caches).
A Hugging Face Hub id that is not a local path is `hf:<id>@<commit>` when the local cache
holds it (the commit is a content address), else `name:<id>`: named, not verified. A local
path that does not exist is `missing`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from iterdpo.atomic import write_text
from iterdpo.errors import StageError, UsageError

if TYPE_CHECKING:  # (iterdpo.stages imports this module: the record is part of every summary)
    from iterdpo.layout import RunLayout
    from iterdpo.stages import Stage

LEDGER_GLOB = "iter-*/*/lineage-*.json"
MISSING = "missing"  # a local path that is not there


class Lineage(BaseModel):
    """What a process (or a whole stage, or a round) read and wrote: path -> digest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    read: dict[str, str] = Field(default_factory=dict, description="Each input's path and its content digest.")
    wrote: dict[str, str] = Field(default_factory=dict, description="Each output's path and its content digest.")

    def merged(self, other: Lineage, *, what: str) -> Lineage:
        """Both records in one; a path seen with two digests raises ValueError naming it."""
        read, wrote = dict(self.read), dict(self.wrote)
        for mine, theirs in ((read, other.read), (wrote, other.wrote)):
            for path, digest in theirs.items():
                if mine.setdefault(path, digest) != digest:
                    raise ValueError(f"{what}: {path} has two contents ({mine[path]} and {digest})")
        return Lineage(read=read, wrote=wrote)


def merge_all(records: Iterable[Lineage], *, what: str) -> Lineage:
    out = Lineage()
    for record in records:
        out = out.merged(record, what=what)
    return out


class LedgerEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str
    iteration: int
    process: str
    lineage: Lineage


# -- digests ------------------------------------------------------------------------------------
def digest(ref: str | os.PathLike) -> str:
    """The content digest of a local file or folder, or the pinned name of a Hub id."""
    path = Path(ref)
    if path.is_file():
        return f"sha256:{_file_sha256(path)}"
    if path.is_dir():
        return f"sha256:{_tree_sha256(path)}"
    text = str(ref)
    if text.startswith(("/", "./", "../")):
        return MISSING  # the program's own check says what is missing, or a ledger that it changed
    commit = _hub_commit(text)
    return f"hf:{text}@{commit}" if commit else f"name:{text}"


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _tree_sha256(root: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(f for f in filenames if not f.startswith(".")):
            full = Path(dirpath) / name
            h.update(f"{full.relative_to(root).as_posix()}\0{_file_sha256(full)}\n".encode())
    return h.hexdigest()


def _hub_commit(repo_id: str) -> str | None:
    """The commit the local Hub cache resolves `repo_id` (a model or a dataset) to, if any."""
    from huggingface_hub import constants

    folder = repo_id.replace("/", "--")
    for kind in ("models", "datasets"):
        ref = Path(constants.HF_HUB_CACHE) / f"{kind}--{folder}" / "refs" / "main"
        if ref.is_file():
            return ref.read_text().strip() or None
    return None


# -- the ledger -----------------------------------------------------------------------------------
def ledger_file(stage_dir: Path, process: str) -> Path:
    return stage_dir / f"lineage-{process}.json"


def recorded(run_root: Path) -> dict[str, tuple[str, str]]:
    """Every path some ledger under `run_root` holds: path -> (digest, who recorded it)."""
    seen: dict[str, tuple[str, str]] = {}
    for file in sorted(run_root.glob(LEDGER_GLOB)):
        try:
            entry = LedgerEntry.model_validate_json(file.read_text())
        except (OSError, ValidationError) as exc:
            raise StageError(f"{file}: not a lineage record ({type(exc).__name__}); remove it to re-record") from None
        who = f"round {entry.iteration} {entry.stage} ({entry.process})"
        for path, value in (*entry.lineage.wrote.items(), *entry.lineage.read.items()):
            seen.setdefault(path, (value, who))
    return seen


def refuse_changed(read: Mapping[str, str], seen: Mapping[str, tuple[str, str]]) -> None:
    """UsageError naming every input whose digest differs from the one a ledger holds."""
    changed = [
        f"{path}: {seen[path][1]} recorded {seen[path][0]}, now {value}"
        for path, value in read.items()
        if path in seen and seen[path][0] != value
    ]
    if changed:
        raise UsageError(
            "an input changed since this run used it (put the original back, or start a run "
            "under a new name): " + "; ".join(changed)
        )


@dataclass(frozen=True)
class Ledger:
    """One process's record in the making: its inputs, digested and checked at open."""

    file: Path
    stage: str
    iteration: int
    process: str
    read: Mapping[str, str]

    def close(self, wrote: Iterable[str | os.PathLike]) -> Lineage:
        """Digest the outputs (in place by now), write the ledger file, return the record."""
        lineage = Lineage(read=dict(self.read), wrote={str(p): digest(p) for p in wrote})
        entry = LedgerEntry(stage=self.stage, iteration=self.iteration, process=self.process, lineage=lineage)
        text = entry.model_dump_json(indent=2) + "\n"
        if not (self.file.is_file() and self.file.read_text() == text):  # a rerun that skipped: unchanged
            write_text(self.file, text)
        return lineage

    def stamp(self, summary, wrote: Iterable[str | os.PathLike]):
        """`summary` (a StageSummary) with this process's lineage, once its outputs `wrote` are in place."""
        return summary.model_copy(update={"lineage": self.close(wrote)})


def open_ledger(
    layout: RunLayout, iteration: int, stage: Stage, *, reads: Iterable[str | os.PathLike | None], process: str = "main"
) -> Ledger:
    """Digest `reads` (None entries: inputs this run does not have) and refuse any that a
    ledger of this run holds under another digest. Call it before the stage skips or does
    its work, and `close` once its outputs are in place."""
    read = {str(p): digest(p) for p in dict.fromkeys(reads) if p is not None}
    refuse_changed(read, recorded(layout.root))
    return Ledger(ledger_file(layout.stage_dir(iteration, stage), process), str(stage), iteration, process, read)
