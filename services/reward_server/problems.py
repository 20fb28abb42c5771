"""Error bodies that name the field at fault and never echo what the client sent.

FastAPI's own 422 carries each bad value back (`input`, and `ctx`), so a 10 MB
response string comes back as a 10 MB error, and a value that JSON cannot encode
(NaN, a lone surrogate) turns the 422 into a 500. Here each problem keeps only
`loc`, `msg` and `type`, each cut short and made encodable, and at most
MAX_PROBLEMS of them are listed (plus a count of the rest).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

MAX_PROBLEMS = 10
MAX_MSG_CHARS = 200
MAX_NAME_CHARS = 64  # a loc part: a field name, which a client may make up (an unknown key)
MAX_LOC_PARTS = 8
# pydantic's words where they mislead ("unable to parse raw data" for a string that JSON
# allowed but UTF-8 cannot encode: a tokenizer would fail on it).
MESSAGES = {"string_unicode": "not valid Unicode (a lone surrogate)"}


def clip(text: object, limit: int) -> str:
    """`text` as a str of at most `limit` characters that UTF-8 can encode."""
    s = text if isinstance(text, str) else str(text)
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    if not s.isascii():
        s = s.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate becomes "?"
    return s


def _loc_part(part: Any) -> str | int:
    return part if isinstance(part, int) and not isinstance(part, bool) else clip(part, MAX_NAME_CHARS)


def problem(loc: Iterable[Any], msg: object, type_: object) -> dict:
    return {
        "loc": [_loc_part(p) for p in list(loc)[:MAX_LOC_PARTS]],
        "msg": clip(msg, MAX_MSG_CHARS),
        "type": clip(type_, MAX_NAME_CHARS),
    }


def validation_body(errors: Sequence[dict]) -> dict:
    """The sanitized 422 body (`schemas.ValidationProblem`) of pydantic/FastAPI errors."""
    shown = [
        problem(e.get("loc", ()), MESSAGES.get(e.get("type", ""), e.get("msg", "")), e.get("type", ""))
        for e in errors[:MAX_PROBLEMS]
    ]
    return {"detail": shown, "omitted": max(0, len(errors) - MAX_PROBLEMS)}


def validation_response(errors: Sequence[dict]) -> JSONResponse:
    return JSONResponse(status_code=422, content=validation_body(errors))


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Replaces FastAPI's RequestValidationError handler (which echoes the input)."""
    return validation_response(exc.errors())
