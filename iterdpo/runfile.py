"""Reading a run file: YAML/JSON -> validated `IterativeDPORun`, with errors a user can act on.

Every error names the field path as the user wrote it (`spec.generation.samplesPerPrompt`)
and, for closed sets, the allowed values. Local paths written as `./x` or `../x`
are made absolute against the run file's folder, so stages can run from anywhere.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel

from iterdpo.errors import UsageError
from iterdpo.spec import CrossFieldError, IterativeDPORun, nested_model
from iterdpo.yamlfile import YamlError, clip, load_one, read_text, short

MAX_PROBLEMS_SHOWN = 8  # the message stays short whatever the file; fix these, then run again
MAX_PROBLEM_CHARS = 240


class SpecError(UsageError):
    """The run file is not a valid IterativeDPORun; `problems` lists 'field: message' lines."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = [clip(p, MAX_PROBLEM_CHARS) for p in problems]
        shown = self.problems[:MAX_PROBLEMS_SHOWN]
        more = len(problems) - len(shown)
        lines = "\n".join(f"  - {p}" for p in shown) + (f"\n  ... and {more} more" if more else "")
        super().__init__(f"{clip(source, 120)} is not a valid IterativeDPORun:\n{lines}")


def is_relative_local(path: str) -> bool:
    return path.startswith("./") or path.startswith("../") or path in (".", "..")


def parse_run(data: object, *, source: str = "run", base_dir: Path | None = None) -> IterativeDPORun:
    """Validate already-parsed data; resolve ./ and ../ paths against `base_dir`."""
    if not isinstance(data, dict):
        raise SpecError(source, [f"the document must be a mapping, got {type(data).__name__}"])
    try:
        # As strict as the API server: "8" is a string, samples_per_prompt an unknown field.
        run = IterativeDPORun.model_validate(data, strict=True, by_alias=True, by_name=False)
    except ValidationError as exc:
        raise SpecError(source, [_describe(err) for err in exc.errors()]) from None
    if base_dir is not None:
        run = _resolve_paths(run, base_dir)
    return run


def load_run(path: str | Path) -> IterativeDPORun:
    """Read and validate a run file (the YAML a user would `kubectl apply`)."""
    path = Path(path)
    return parse_run(read_document(path), source=str(path), base_dir=path.resolve().parent)


def read_document(path: Path) -> object:
    """The one YAML (or JSON) document of a run file, read with every input bounded."""
    try:
        data = load_one(read_text(path))
    except YamlError as exc:
        raise SpecError(str(path), [str(exc)]) from None
    if data is None:
        raise SpecError(str(path), ["the file holds no YAML document"])
    return data


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
    training = spec.reward.training and spec.reward.training.model_copy(update={
        "base": fix(spec.reward.training.base),
        "data": spec.reward.training.data.model_copy(update={"dataset": fix(spec.reward.training.data.dataset)}),
    })  # fmt: skip
    components = spec.reward.components and [c.model_copy(update={"model": fix(c.model)}) for c in spec.reward.components]
    sft = spec.policy.sft and spec.policy.sft.model_copy(update={
        "data": spec.policy.sft.data.model_copy(update={"dataset": fix(spec.policy.sft.data.dataset)}),
    })  # fmt: skip
    evaluation = spec.evaluation
    if evaluation is not None:
        judge = evaluation.judge and evaluation.judge.model_copy(update={
            "model": fix(evaluation.judge.model),
            "components": evaluation.judge.components and [c.model_copy(update={"model": fix(c.model)})
                                                           for c in evaluation.judge.components],
        })  # fmt: skip
        evaluation = evaluation.model_copy(update={
            "prompts": evaluation.prompts.model_copy(update={"dataset": fix(evaluation.prompts.dataset)}),
            "judge": judge,
        })  # fmt: skip
    new_spec = spec.model_copy(
        update={
            "evaluation": evaluation,
            "policy": spec.policy.model_copy(update={"model": fix(spec.policy.model), "sft": sft}),
            "reward": spec.reward.model_copy(update={"model": fix(spec.reward.model), "training": training,
                                                     "components": components}),  # fmt: skip
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
    path = clip(".".join(loc) or "(document)", 120)
    got = short(err.get("input"))
    if kind == "literal_error":
        return f"{path}: unknown value {got}; allowed: {ctx.get('expected')}"
    if kind == "extra_forbidden":
        allowed = _field_names_at(loc[:-1])
        camel = to_camel(loc[-1])
        hint = [camel] if camel in allowed else difflib.get_close_matches(loc[-1], allowed, n=1)
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
        return f"{path}: must be {bounds[kind]} {limit} (got {got})"
    message = _STRICT_WORDING.get(kind) or err["msg"].removeprefix("Value error, ")
    return f"{path}: {message} (got {got})" if kind not in ("value_error",) else f"{path}: {message}"


# Strict-mode messages, in the schema's words (what `kubectl apply` would say).
_STRICT_WORDING = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string (quote it)",
    "bool_type": "must be true or false",
    "finite_number": "must be a finite number",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "list_type": "must be a list",
}


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

    from iterdpo.localpaths import check_local_paths

    run = load_run(path)
    RunLayout.of(run)  # spec.storage.root must be set: a UsageError naming it otherwise
    check_local_paths(run, str(path), Path(path).resolve().parent)
    d = stage_def(stage)
    rounds = [t for t, planned in stage_order(run) if planned.stage == d.stage]
    if not rounds:
        raise UsageError(f"{d.stage} is not a stage of this run (the section of the spec that enables it is not set)")
    if iteration not in rounds:
        span = f"rounds {rounds[0]}..{rounds[-1]}" if len(rounds) > 1 else f"round {rounds[0]} only"
        raise UsageError(f"--iteration: {d.stage} runs in {span} (spec.iterations is "
                         f"{run.spec.iterations}); got {iteration}")  # fmt: skip
    return run
