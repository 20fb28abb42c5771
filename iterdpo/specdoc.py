"""Write the run-file field reference (docs/run-file.md) from the typed spec.

The spec model is the one source of truth; this page is derived from it, and a
test fails when the committed page drifts. Regenerate with:

    python -m iterdpo.specdoc > docs/run-file.md
"""

from __future__ import annotations

import typing

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from iterdpo import yamlfile
from iterdpo.kubevalues import StringFormat

from iterdpo.spec import RULES, IterativeDPORunSpec, nested_model

_BOUNDS = ((Ge, "ge", ">="), (Gt, "gt", ">"), (Le, "le", "<="), (Lt, "lt", "<"))


def field_rows(model: type[BaseModel], prefix: str = "spec") -> list[tuple[str, str, str, str]]:
    """(path, type and limits, default, description) for every field, depth first."""
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}.{field.alias or name}"
        nested = nested_model(field.annotation)
        rows.append((path, _type_text(field), _default_text(field, nested), field.description or ""))
        if nested is not None:
            rows += field_rows(nested, path + ("[]" if _is_list(field.annotation) else ""))
    return rows


def render() -> str:
    lines = [
        "# Run file reference",
        "",
        "Every field of `spec` in an `IterativeDPORun` (apiVersion `iterdpo.io/v1alpha1`).",
        "Generated from `iterdpo/spec.py` by `python -m iterdpo.specdoc`; do not edit by hand.",
        "",
        "How a run file is read (`iterdpo/yamlfile.py`, as strictly as the API server would): one",
        f"UTF-8 YAML document of at most {yamlfile.MAX_BYTES} bytes; a duplicate key, nesting deeper than",
        f"{yamlfile.MAX_DEPTH} levels, aliases expanding past {yamlfile.MAX_NODES} values and integers of more than",
        f"{yamlfile.MAX_INT_DIGITS} digits are refused. Types are strict: `\"8\"` is a string, not a number, and",
        "`samples_per_prompt` an unknown field; `1e-6` is a number, as kubectl reads it. Every number has",
        "an upper bound (below), NaN and infinities are refused. `iterdpo validate`, `plan` and `run` also",
        "check the local paths on this machine (a model folder with config.json, a non-empty prompt file,",
        "a storage root that can be created, lengths within the model's context);",
        "`iterdpo validate --kubernetes` checks what the operator checks instead. Each problem is one",
        "line naming the field (at most 8 shown); the exit status is 2.",
        "",
        "Cross-field rules, checked before anything runs (by `iterdpo validate`, and by the API server",
        "through the CRD's CEL rules); each is one entry of `iterdpo.spec.RULES`:",
        "",
        *(f"- `{rule.blames}` {rule.message}." for rule in RULES),
        "",
        "| field | type | default | description |",
        "| --- | --- | --- | --- |",
    ]
    for path, type_text, default, description in field_rows(IterativeDPORunSpec):
        lines.append(f"| `{path}` | {type_text} | {default} | {description} |")
    return "\n".join(lines) + "\n"


def _type_text(field) -> str:
    annotation = field.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(f"`{v}`" for v in typing.get_args(annotation))
    if args and typing.get_origin(annotation) in (typing.Union, type(int | None)):
        annotation = args[0]
    metadata = list(field.metadata) + list(getattr(annotation, "__metadata__", ()))
    base = typing.get_origin(annotation) is typing.Annotated and typing.get_args(annotation)[0] or annotation
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        inner = typing.get_args(item)[0] if typing.get_origin(item) is typing.Annotated else item
        name = f"list of {getattr(inner, '__name__', str(inner))}"
    else:
        name = getattr(base, "__name__", str(base))
    metadata += [inner for m in metadata for inner in getattr(m, "metadata", ())]  # Field(...) inside Annotated
    limits = [f"{sign} {getattr(m, attr)}" for m in metadata for cls, attr, sign in _BOUNDS if isinstance(m, cls)]
    limits += [m.name for m in metadata if isinstance(m, StringFormat)]
    return name + (f" ({', '.join(limits)})" if limits else "")


def _default_text(field, nested) -> str:
    if field.is_required():
        return "required"
    if nested is not None or field.default_factory is not None:
        return "" if field.default_factory is None or field.default_factory() != [] else "`[]`"
    default = field.default
    if default is PydanticUndefined or default is None:
        return "unset"
    return f"`{str(default).lower() if isinstance(default, bool) else default}`"


def _is_list(annotation) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    return any(_is_list(a) for a in typing.get_args(annotation))


if __name__ == "__main__":
    print(render(), end="")
