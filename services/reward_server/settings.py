"""The reward server's one typed config object, validated before anything is loaded.

What to serve (the model, its kind, chat template, maxLength, batchTokens) is declared
once, in the run file's `spec.reward` (`iterdpo.spec.RewardSpec`): the planner starts
the server as `serve-reward --spec RUN_FILE`. For standalone use the same options are
flags generated from that model (`--model`, `--kind`, `--chat-template FILE`,
`--max-length`, `--batch-tokens`), with its defaults, bounds and descriptions. How to
serve (host, port, dtype, device, and the limits on what a client may send) is the
server's own. A bad flag fails fast (exit 2) and names itself.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from iterdpo.errors import UsageError
from iterdpo.planner import REWARD_TOKEN_ENV
from iterdpo.layout import reward_model_for
from iterdpo.localpaths import model_problems
from iterdpo.runfile import load_run
from iterdpo.spec import MAX_ITEMS_PER_REQUEST, MODEL_KINDS, RULES, RewardSpec

MAX_ITEM_CHARS = 1_000_000
MAX_BODY_BYTES = 32 * 1024 * 1024
# The server's own limits, one flag each (`max_body_bytes` -> --max-body-bytes); defaults live on Settings.
LIMIT_FIELDS = ("max_body_bytes", "max_items", "max_item_chars", "max_queue", "body_timeout_seconds")
# spec.reward's fields the server reads (the rest are the annotator's: batch size, retries, ...).
SERVER_FIELDS = ("model", "kind", "chat_template", "max_length", "batch_tokens")


class SettingsError(UsageError):
    """A flag (or the run file's spec.reward) has a bad value; the message names it."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    reward: RewardSpec = Field(description="What to serve: the run file's spec.reward, or the flags.")
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    dtype: Literal["float32", "bfloat16"] | None = Field(
        default=None, description="None: float32 on the CPU, bfloat16 on CUDA."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    token: str | None = Field(default=None, repr=False, description="Bearer token every path but /healthz and /readyz requires ($ITERDPO_REWARD_TOKEN).")
    max_body_bytes: Annotated[int, Field(ge=1)] = Field(
        default=MAX_BODY_BYTES, description="Largest request body in bytes; a larger one gets 413 before it is read."
    )
    max_items: Annotated[int, Field(ge=1)] = Field(
        default=MAX_ITEMS_PER_REQUEST, description="Most items in one scoring request (422 past it)."
    )
    max_item_chars: Annotated[int, Field(ge=1)] = Field(
        default=MAX_ITEM_CHARS, description="Most characters in one message content or response (422 past it)."
    )
    max_queue: Annotated[int, Field(ge=0)] = Field(
        default=64, description="Most requests waiting for the model while one is scored (429 with Retry-After past it)."
    )
    body_timeout_seconds: Annotated[float, Field(gt=0)] = Field(
        default=30.0, description="Longest time a whole request body may take to arrive (408 past it)."
    )

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SettingsError("--device: cuda was asked for but torch sees no CUDA device")
        return self.device

    def resolved_dtype(self, device: str) -> str:
        return self.dtype or ("bfloat16" if device == "cuda" else "float32")


def _flag(name: str) -> str:
    """The flag of a spec.reward field, by its Python name or its camelCase alias."""
    for n, f in RewardSpec.model_fields.items():
        if f.alias == name:
            name = n
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iterdpo serve-reward",
        description="Serve a reward model (or a rule) over HTTP: POST /v1/score, POST /v1/compare, POST /get_reward "
        "(OpenRLHF), GET /healthz, GET /readyz.",
    )
    p.add_argument("--spec", type=Path, help="run file: serve its spec.reward (how the planner starts the server)")
    p.add_argument("--judge", action="store_true", help="with --spec: serve spec.evaluation.judge instead")
    for name in SERVER_FIELDS:  # standalone use: spec.reward's fields as flags
        field = RewardSpec.model_fields[name]
        default = "" if field.is_required() or field.default is None else f" (default {field.default})"
        if name == "chat_template":
            p.add_argument("--chat-template", metavar="FILE", help=f"file holding the template. {field.description}")
        else:
            p.add_argument(_flag(name), help=f"{field.description}{default}")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    for name in LIMIT_FIELDS:  # validated by Settings, so a bad value names its flag
        field = Settings.model_fields[name]
        p.add_argument(_flag(name), metavar="N", help=f"{field.description} (default {field.default})")
    return p


def settings_from_args(argv: list[str] | None) -> Settings:
    """Parse and validate; raises SettingsError naming the flag (or spec field) at fault."""
    args = build_parser().parse_args(argv)
    given = {name: getattr(args, name) for name in SERVER_FIELDS if getattr(args, name) is not None}
    if args.spec is not None:
        if given:
            raise SettingsError(f"{_flag(next(iter(given)))}: with --spec, spec.reward is the one place for it; drop the flag")
        run = load_run(args.spec)  # the model it names, or the one its RewardModel stage trained
        if args.judge:
            if run.spec.evaluation is None or run.spec.evaluation.judge is None:
                raise SettingsError(f"--judge: {args.spec} sets no spec.evaluation.judge")
            reward = run.spec.evaluation.judge
        else:
            reward = run.spec.reward.model_copy(update={"model": reward_model_for(run)})
    elif args.judge:
        raise SettingsError("--judge: serves a run file's spec.evaluation.judge; give --spec")
    else:
        reward = _reward_from_flags(given)
    section = "spec.evaluation.judge" if args.judge else "spec.reward"
    field, length = (f"{section}.model", f"{section}.maxLength") if args.spec else ("--model", "--max-length")
    if args.spec and not args.judge and run.spec.reward.training is not None:
        field = "the reward model of spec.reward.training (the RewardModel stage writes it)"
    problems = model_problems(field, reward.model, {length: reward.max_length}) if reward.reads_model else []
    if problems:  # a local folder that cannot be the model: say so, before Hugging Face calls it a bad repo id
        raise SettingsError("; ".join(problems))
    try:
        limits = {name: getattr(args, name) for name in LIMIT_FIELDS if getattr(args, name) is not None}
        return Settings(reward=reward, host=args.host, port=args.port, dtype=args.dtype, device=args.device,
                        token=os.environ.get(REWARD_TOKEN_ENV) or None, **limits)  # fmt: skip
    except ValidationError as exc:
        raise SettingsError("; ".join(_describe(e) for e in exc.errors())) from None


def _reward_from_flags(given: dict) -> RewardSpec:
    if "model" not in given and given.get("kind", "bradley-terry") in MODEL_KINDS:
        raise SettingsError("--model: required without --spec (the reward model folder or hub id), "
                            "unless --kind reads none (verifiable)")
    if "chat_template" in given:
        path = Path(given["chat_template"])
        if given["chat_template"].lower() == "none":
            del given["chat_template"]
        else:
            try:
                given["chat_template"] = path.read_text()
            except OSError as exc:
                raise SettingsError(f"--chat-template: cannot read {path}: {exc.strerror}") from None
            if not given["chat_template"].strip():
                raise SettingsError(f"--chat-template: {path} is empty")
    if given.get("kind") == "composite":
        raise SettingsError("--kind: composite is served from a run file (--spec), whose spec.reward.components "
                            "lists its terms")
    try:
        reward = RewardSpec(**given)
    except ValidationError as exc:
        raise SettingsError("; ".join(_describe(e) for e in exc.errors())) from None
    for rule in RULES:  # the cross-field rules on spec.reward hold for the flags too
        if rule.at == "reward" and not rule.holds(reward):
            raise SettingsError(f"{_flag(rule.field)}: {rule.explain(reward)}")
    return reward


def _describe(err: dict) -> str:
    loc = [str(p) for p in err["loc"] if p != "reward"]
    flag = _flag(loc[0]) if loc else "--model"
    return f"{flag}: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})"
