"""Check a run's local paths on this machine, before anything runs or is written.

The model cannot: it is pure (the operator validates the same spec where the paths
do not exist). So `iterdpo validate`, `plan`, `run` and every stage program call
`check_local_paths` after loading, and a missing model folder, a prompt file that is
empty or a folder, or a storage root that cannot be created is one short error
naming the field, instead of a traceback minutes later inside vLLM or DeepSpeed.
A value without /, ./ or ../ is a hub id; where a local folder of that name sits next
to the run file, the error says which one was assumed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from iterdpo.spec import IterativeDPORun, is_local
from iterdpo.yamlfile import clip

PROMPT_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
# Where a transformers config states its context length (vLLM reads the same keys).
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")
MAX_CONFIG_BYTES = 16 << 20
PATH_CHARS = 160  # a path is quoted whole up to this length


def local_path_problems(run: IterativeDPORun, base_dir: Path | None = None) -> list[str]:
    """'field: problem' lines for the run's local paths (hub ids are not looked up)."""
    spec = run.spec
    context = {
        "spec.policy.model": {"spec.generation.maxModelLen": spec.generation_max_model_len,
                              "spec.training.maxLength": spec.training.max_length},
        "spec.reward.model": {"spec.reward.maxLength": spec.reward.max_length},
        "spec.reward.training.base": {"spec.reward.maxLength": spec.reward.max_length},
    }
    problems: list[str] = []
    training = spec.reward.training
    if training and training.held_out_split and is_local(training.data.dataset) and Path(training.data.dataset).is_file():
        problems.append(f"spec.reward.training.heldOutSplit: {clip(training.data.dataset, PATH_CHARS)} is one file, "
                        "which has one split: hold out a share instead (heldOutShare), or give a folder or hub "
                        f"dataset that has a {training.held_out_split!r} split")  # fmt: skip
    for field, kind, value in spec.path_fields():
        if kind == "model":
            limits = context.get(field, {"spec.reward.maxLength": spec.reward.max_length})  # else a reward component
            problems += model_problems(field, value, limits, base_dir, where=_on_volume(run, value))
        elif kind == "dataset":
            problems += _dataset_problems(field, value, base_dir, where=_on_volume(run, value))
        else:
            problems += root_problems(field, Path(value))
    return problems


def _on_volume(run: IterativeDPORun, value: str) -> str:
    """' on the volume (...)' for a path under the run's mount path, when it names a claim: in a
    pod (the stage programs read the pod's copy of the run) that is where it was looked for."""
    volume = run.spec.kubernetes.volume
    if volume.claim_name and is_local(value) and Path(value).is_relative_to(volume.mount_path):
        return f" on the volume (claim {volume.claim_name}, mounted at {volume.mount_path} in the pods)"
    return ""


def _hub_id_problem(field: str, value: str, base_dir: Path | None) -> list[str]:
    near = (base_dir or Path.cwd()) / value
    if near.exists():
        return [f"{field}: {clip(value, PATH_CHARS)!r} is taken as a hub id (local paths start with /, ./ or ../), but {near} "
                f"exists here: write './{clip(value, PATH_CHARS)}' to use it"]  # fmt: skip
    return []


def model_problems(field: str, value: str, lengths: dict[str, int], base_dir: Path | None = None,
                   where: str = "") -> list[str]:  # fmt: skip
    """A model field's problems: the folder, its config.json, and `lengths` (field -> tokens)
    that must fit in the model's context. `where`: where it was looked for, if not here."""
    if not is_local(value):
        return _hub_id_problem(field, value, base_dir)
    path = Path(value)
    if not path.exists():
        return [f"{field}: {clip(value, PATH_CHARS)} does not exist{where} (a model folder, as saved by save_pretrained)"]
    if not path.is_dir():
        return [f"{field}: {clip(value, PATH_CHARS)} is a file; a model is a folder holding config.json and the weights"]
    if not any(path.iterdir()):
        return [f"{field}: {clip(value, PATH_CHARS)} is an empty folder; it needs config.json and the weights"]
    config = path / "config.json"
    if not config.is_file():
        return [f"{field}: {clip(value, PATH_CHARS)} has no config.json: not a transformers model folder"]
    try:
        if config.stat().st_size > MAX_CONFIG_BYTES:
            return [f"{field}: {config} is larger than {MAX_CONFIG_BYTES} bytes: not a model config"]
        data = json.loads(config.read_bytes())
    except (OSError, ValueError) as exc:
        return [f"{field}: cannot read {config}: {clip(str(exc), 120)}"]
    if not isinstance(data, dict):
        return [f"{field}: {config} is not a JSON object"]
    positions = next((data[k] for k in POSITION_KEYS if isinstance(data.get(k), int)), None)
    if positions is None or data.get("rope_scaling"):  # scaled positions: vLLM derives the length itself
        return []
    return [f"{name}: {length} is more than the model's context, {positions} tokens ({field} config.json "
            f"{next(k for k in POSITION_KEYS if k in data)})"
            for name, length in lengths.items() if length > positions]  # fmt: skip


def _dataset_problems(field: str, value: str, base_dir: Path | None, where: str = "") -> list[str]:
    if not is_local(value):
        return _hub_id_problem(field, value, base_dir)
    path = Path(value)
    if not path.exists():
        return [f"{field}: {clip(value, PATH_CHARS)} does not exist{where} (a {', '.join(PROMPT_SUFFIXES)} file, or a folder of them)"]
    if path.is_file():
        if path.suffix not in PROMPT_SUFFIXES:
            return [f"{field}: {clip(value, PATH_CHARS)} has type {path.suffix or '(none)'!r}; allowed: {', '.join(PROMPT_SUFFIXES)} "
                    "(or a folder saved with datasets)"]  # fmt: skip
        if path.stat().st_size == 0:
            return [f"{field}: {clip(value, PATH_CHARS)} is empty"]
        return []
    if path.is_dir():
        if not any(path.iterdir()):
            return [f"{field}: {clip(value, PATH_CHARS)} is an empty folder"]
        return []
    return [f"{field}: {clip(value, PATH_CHARS)} is neither a file nor a folder"]


def root_problems(field: str, root: Path) -> list[str]:
    """The folder must be creatable and writable: the nearest existing ancestor decides."""
    probe = root
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe == root and not root.is_dir():
        return [f"{field}: {clip(str(root), PATH_CHARS)} is a file; the run's artifacts need a folder"]
    if not probe.is_dir():
        return [f"{field}: cannot create {clip(str(root), PATH_CHARS)}: {probe} is a file"]
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == root else f"cannot be created: {probe} is not writable"
        return [f"{field}: {clip(str(root), PATH_CHARS)} {what} by this user"]
    return []


def require_model(path: str, what: str, iteration: int) -> None:
    """A stage's model, checked before it is loaded: a local path that is not a model folder is
    a StageError naming it (exit 1: an earlier stage may not have run), never a hub error."""
    from iterdpo.errors import StageError

    problems = model_problems(what, path, {}) if is_local(path) else []
    if problems:
        hint = f"; run the Train stage of round {iteration - 1} first" if iteration > 1 else ""
        raise StageError(problems[0] + hint)


def runner_problems(run: IterativeDPORun) -> list[str]:
    """What `iterdpo run` cannot do on one machine, though a cluster can."""
    trainings = {"spec.training": run.spec.training, "spec.reward.training": run.spec.reward.training}
    return [f"{where}.nodes: iterdpo run trains on this machine only; set 1, or run it on Kubernetes "
            f"(got {t.nodes})"  # torchrun would wait forever for the other nodes to join
            for where, t in trainings.items() if t is not None and t.nodes > 1]  # fmt: skip


def check_local_paths(run: IterativeDPORun, source: str, base_dir: Path | None = None) -> IterativeDPORun:
    """`run`, or SpecError (exit 2) listing each local path that cannot work here."""
    from iterdpo.runfile import SpecError

    problems = local_path_problems(run, base_dir)
    if problems:
        raise SpecError(source, problems)
    return run
