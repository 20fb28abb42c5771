"""The reward server's one typed config object, built from the command line and
validated before anything is loaded, so a bad flag fails fast and names itself.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from iterdpo.planner import REWARD_TOKEN_ENV
from iterdpo.spec import SCORER_KINDS

MAX_ITEMS_PER_REQUEST = 4096


class SettingsError(ValueError):
    """A flag has a bad value; the message names the flag."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Reward model folder (or hub id).")
    kind: Literal[SCORER_KINDS] = "bradley-terry"  # type: ignore[valid-type]
    chat_template: str | None = Field(
        default=None, description="Jinja template text that replaces the tokenizer's own (read from --chat-template)."
    )
    max_length: Annotated[int, Field(ge=16)] = 4096
    batch_tokens: Annotated[int, Field(ge=16)] = 16384
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    dtype: Literal["float32", "bfloat16"] | None = Field(
        default=None, description="None: float32 on the CPU, bfloat16 on CUDA."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    token: str | None = Field(default=None, repr=False, description="Bearer token /v1/score requires ($ITERDPO_REWARD_TOKEN).")

    @model_validator(mode="after")
    def _batch_fits_one_item(self) -> Settings:
        if self.batch_tokens < self.max_length:
            # Otherwise one conversation of max_length tokens could never be scored within budget.
            raise ValueError(
                f"batch_tokens: must be >= max_length ({self.max_length}) so that one "
                f"conversation fits a forward pass (got {self.batch_tokens})"
            )
        return self

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SettingsError("--device: cuda was asked for but torch sees no CUDA device")
        return self.device

    def resolved_dtype(self, device: str) -> str:
        return self.dtype or ("bfloat16" if device == "cuda" else "float32")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iterdpo serve-reward",
        description="Serve a scalar reward model over HTTP: POST /v1/score, GET /healthz, GET /readyz.",
    )
    p.add_argument("--model", required=True, help="reward model folder (or hub id)")
    p.add_argument("--kind", default="bradley-terry", help=f"how to read a score; one of {', '.join(SCORER_KINDS)}")
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE_OR_NONE",
        help="file holding a Jinja chat template that replaces the reward tokenizer's own; "
        "'none' or absent: use the tokenizer's own",
    )
    p.add_argument(
        "--chat-template-text",
        default=None,
        metavar="JINJA",
        help="the chat template itself (how the planner passes spec.reward.chatTemplate); "
        "excludes --chat-template",
    )
    p.add_argument("--max-length", type=int, default=4096, help="tokens kept per conversation (truncated from the left)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="most padded tokens in one forward pass")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return p


def settings_from_args(argv: list[str] | None) -> Settings:
    """Parse and validate; raises SettingsError naming the flag at fault."""
    args = build_parser().parse_args(argv)
    template = None
    if args.chat_template and args.chat_template.lower() != "none":
        path = Path(args.chat_template)
        try:
            template = path.read_text()
        except OSError as exc:
            raise SettingsError(f"--chat-template: cannot read {path}: {exc.strerror}") from None
        if not template.strip():
            raise SettingsError(f"--chat-template: {path} is empty")
    if args.chat_template_text is not None:
        if template is not None:
            raise SettingsError("--chat-template-text: give either --chat-template or --chat-template-text, not both")
        if not args.chat_template_text.strip():
            raise SettingsError("--chat-template-text: is empty")
        template = args.chat_template_text
    values = {k: v for k, v in vars(args).items() if k not in ("chat_template", "chat_template_text")}
    token = os.environ.get(REWARD_TOKEN_ENV) or None
    try:
        return Settings(**values, chat_template=template, token=token)
    except ValidationError as exc:
        raise SettingsError("; ".join(_describe(e) for e in exc.errors())) from None


def _describe(err: dict) -> str:
    msg = err["msg"].removeprefix("Value error, ")
    if err["loc"]:
        flag = "--" + str(err["loc"][0]).replace("_", "-")
        return f"{flag}: {msg} (got {err.get('input')!r})"
    # A model-level rule: its message starts with the field name.
    field, _, rest = msg.partition(": ")
    return f"--{field.replace('_', '-')}: {rest}"
