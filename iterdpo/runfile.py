"""Reading a run file: YAML/JSON -> validated `IterativeDPORun`, with errors a user can act on.

Every error names the field path as the user wrote it (`spec.generation.samplesPerPrompt`)
and, for closed sets, the allowed values. Local paths written as `./x` or `../x`
are made absolute against the run file's folder, so stages can run from anywhere.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from iterdpo.errors import UsageError
from iterdpo.spec import CrossFieldError, IterativeDPORun, nested_model


class SpecError(UsageError):
    """The run file is not a valid IterativeDPORun; `problems` lists 'field: message' lines."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} is not a valid IterativeDPORun:\n{lines}")


def is_relative_local(path: str) -> bool:
    return path.startswith("./") or path.startswith("../") or path in (".", "..")


def parse_run(data: object, *, source: str = "run", base_dir: Path | None = None) -> IterativeDPORun:
    """Validate already-parsed data; resolve ./ and ../ paths against `base_dir`."""
    if not isinstance(data, dict):
        raise SpecError(source, [f"the document must be a mapping, got {type(data).__name__}"])
    try:
        run = IterativeDPORun.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, [_describe(err) for err in exc.errors()]) from None
    if base_dir is not None:
        run = _resolve_paths(run, base_dir)
    return run


def load_run(path: str | Path) -> IterativeDPORun:
    """Read and validate a run file (the YAML a user would `kubectl apply`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(str(path), [f"cannot read the file: {exc.strerror}"]) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise SpecError(str(path), [f"not valid YAML: {exc}"]) from None
    if len(docs) != 1:
        raise SpecError(str(path), [f"expected exactly one YAML document, found {len(docs)}"])
    return parse_run(docs[0], source=str(path), base_dir=path.resolve().parent)


def dump_run(run: IterativeDPORun, path: Path) -> None:
    """Write the resolved run as JSON (what stage programs read with --spec)."""
    from iterdpo.atomic import write_json

    write_json(path, run.to_manifest())


def _resolve_paths(run: IterativeDPORun, base_dir: Path) -> IterativeDPORun:
    def fix(value):
        if value is not None and is_relative_local(value):
            return str((base_dir / value).resolve())
        return value

    spec = run.spec
    prompts = spec.prompts.model_copy(
        update={
            "dataset": fix(spec.prompts.dataset),
            "per_iteration": [p.model_copy(update={"dataset": fix(p.dataset)}) for p in spec.prompts.per_iteration]
            if spec.prompts.per_iteration
            else None,
        }
    )
    new_spec = spec.model_copy(
        update={
            "policy": spec.policy.model_copy(update={"model": fix(spec.policy.model)}),
            "reward": spec.reward.model_copy(update={"model": fix(spec.reward.model)}),
            "prompts": prompts,
            "storage": spec.storage.model_copy(update={"root": fix(spec.storage.root)}),
        }
    )
    return run.model_copy(update={"spec": new_spec})


# --- error wording -------------------------------------------------------------------------


def _describe(err: dict) -> str:
    loc = [str(p) for p in err["loc"]]
    kind = err["type"]
    ctx = err.get("ctx") or {}
    original = ctx.get("error")
    if isinstance(original, CrossFieldError):
        return f"spec.{original.field}: {original.message}"
    path = ".".join(loc) or "(document)"
    got = err.get("input")
    if kind == "literal_error":
        return f"{path}: unknown value {got!r}; allowed: {ctx.get('expected')}"
    if kind == "extra_forbidden":
        allowed = _field_names_at(loc[:-1])
        hint = difflib.get_close_matches(loc[-1], allowed, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"{path}: unknown field{suggestion}; allowed fields: {', '.join(allowed)}"
    if kind == "missing":
        return f"{path}: required field is missing"
    bounds = {
        "greater_than_equal": ">=",
        "greater_than": ">",
        "less_than_equal": "<=",
        "less_than": "<",
    }
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"{path}: must be {bounds[kind]} {limit} (got {got!r})"
    message = err["msg"].removeprefix("Value error, ")
    return f"{path}: {message} (got {got!r})" if kind not in ("value_error",) else f"{path}: {message}"


def _field_names_at(loc: list[str]) -> list[str]:
    """The YAML field names allowed at `loc` (walks the model by alias)."""
    model: type[BaseModel] | None = IterativeDPORun
    for part in loc:
        if part.isdigit():  # an index into a list of models
            continue
        if model is None:
            return []
        field = next(
            (f for name, f in model.model_fields.items() if (f.alias or name) == part),
            None,
        )
        if field is None:
            return []
        model = nested_model(field.annotation)
    if model is None:
        return []
    return [f.alias or name for name, f in model.model_fields.items()]



def load_for_stage(path: str | Path, iteration: int, stage: str) -> IterativeDPORun:
    """The run file a stage program was given, checked before any work: the round must be
    one the planner runs the stage in (UsageError, exit 2, otherwise). The program then
    checks its own flags and claims the run folder (`layout.claim_run_folder`) before
    writing anything."""
    from iterdpo.layout import RunLayout
    from iterdpo.planner import stage_order
    from iterdpo.stages import stage_def

    run = load_run(path)
    RunLayout.of(run)  # spec.storage.root must be set: a UsageError naming it otherwise
    d = stage_def(stage)
    rounds = [t for t, planned in stage_order(run) if planned.stage == d.stage]
    if iteration not in rounds:
        span = f"{rounds[0]}..{rounds[-1]}" if rounds else "no round"
        raise UsageError(f"--iteration: {d.stage} runs in rounds {span} (spec.iterations is "
                         f"{run.spec.iterations}); got {iteration}")  # fmt: skip
    return run
