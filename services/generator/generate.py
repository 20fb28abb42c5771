"""The Generate stage: K responses per prompt with vLLM, for one shard of the round's prompts.

    iterdpo generate --spec RUN_FILE --iteration T --shard I

On Kubernetes the shard comes from JOB_COMPLETION_INDEX (an Indexed Job), so
`--shard` may be omitted there. Output: one JSONL shard written atomically, then
a success marker with the counts; a shard whose marker exists is not redone.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from iterdpo.chat import end_of_turn_ids
from iterdpo.contracts import GeneratedRecord, LeftOut, ShardMarker, read_model, write_lines, write_model
from iterdpo.errors import StageError, UsageError, stage_main
from iterdpo.layout import RunLayout, claim_run_folder, policy_for
from iterdpo.lineage import open_ledger
from iterdpo.localpaths import require_model
from iterdpo.prompts import Prompt, load_prompt_set
from iterdpo.runfile import load_for_stage
from iterdpo.sharding import shard_range
from iterdpo.spec import IterativeDPORun
from iterdpo.stages import GenerateSummary, Stage
from iterdpo.summary import emit_summary

PROG = "iterdpo generate"

log = logging.getLogger("iterdpo.generate")


@dataclass(frozen=True)
class FormattedPrompt:
    prompt: Prompt
    token_ids: list[int]


def prompt_seed(base_seed: int, iteration: int, prompt_id: str) -> int:
    """Each prompt's sampling seed: independent of sharding, different every round."""
    digest = hashlib.sha256(f"{base_seed}/{iteration}/{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def format_prompts(prompts: list[Prompt], tokenizer, *, max_prompt_tokens: int):
    """Apply the policy's chat template; leave out (with the reason) prompts too long to train on."""
    kept, left_out = [], []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_tokens:
            left_out.append(
                LeftOut(
                    prompt_id=prompt.prompt_id,
                    reason=f"prompt is {len(ids)} tokens, more than training.maxPromptLength ({max_prompt_tokens})",
                )
            )
        else:
            kept.append(FormattedPrompt(prompt, ids))
    return kept, left_out


def run_shard(run: IterativeDPORun, iteration: int, shard: int, policy: str | None = None) -> ShardMarker:
    spec = run.spec
    layout = RunLayout.of(run)
    shards = spec.generation.shards
    marker = layout.shard_marker(iteration, shard, shards)
    if marker.exists():
        log.info("shard %d of %d of round %d is already done (%s)", shard, shards, iteration, marker)
        return read_model(marker, ShardMarker)

    started = time.monotonic()
    policy = policy or policy_for(run, iteration)
    require_model(policy, f"the policy of round {iteration}", iteration)
    source = spec.prompts_for(iteration)
    prompt_set = load_prompt_set(
        source, field_path=f"spec.prompts.perIteration[{iteration - 1}]" if spec.prompts.per_iteration else "spec.prompts"
    )
    indices = shard_range(len(prompt_set.prompts), shard, shards)
    mine = [prompt_set.prompts[i] for i in indices]
    mine_ids = {str(i) for i in indices}
    left_out = [item for item in prompt_set.left_out if item.prompt_id in mine_ids]

    tokenizer = load_tokenizer(policy, spec.policy.chat_template)
    formatted, too_long = format_prompts(
        [p for p in mine if p is not None], tokenizer, max_prompt_tokens=spec.training.max_prompt_length
    )
    left_out += too_long
    log.info(
        "round %d shard %d/%d: %d prompts (%d left out), K=%d, policy %s",
        iteration, shard, shards, len(mine), len(left_out), spec.generation.samples_per_prompt, policy,
    )
    outputs = _generate(run, iteration, policy, tokenizer, formatted) if formatted else []

    records = [
        GeneratedRecord(
            prompt_id=item.prompt.prompt_id,
            prompt=item.prompt.messages,
            responses=[c.text for c in out.outputs],
            finish_reasons=[c.finish_reason for c in out.outputs],
            response_tokens=[len(c.token_ids) for c in out.outputs],
            answer=item.prompt.answer,
        )
        for item, out in zip(formatted, outputs)
    ]
    write_lines(layout.shard_file(iteration, shard, shards), records)
    result = ShardMarker(  # its validator checks prompts_in == prompts_out + len(left_out)
        iteration=iteration,
        shard=shard,
        shards=shards,
        policy=policy,
        prompts_in=len(mine),
        prompts_out=len(records),
        samples=sum(len(r.responses) for r in records),
        left_out=sorted(left_out, key=lambda x: int(x.prompt_id)),
        seconds=round(time.monotonic() - started, 3),
    )
    write_model(marker, result)  # last: the marker says the shard is complete
    return result


def load_tokenizer(policy: str, chat_template: str | None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    if chat_template:
        tokenizer.chat_template = chat_template
    if not tokenizer.chat_template:
        raise StageError(f"the policy tokenizer of {policy} has no chat template: set spec.policy.chatTemplate")
    return tokenizer


def stop_token_ids(gen, tokenizer, chat_template: str | None) -> list[int]:
    """What sampling stops on: generation.stopTokenIds, the tokenizer's EOS, and the special
    tokens the policy's template ends an assistant turn with (Llama-3's <|eot_id|>, ChatML's
    <|im_end|>): the ending the Train stage teaches (iterdpo.chat), so a round's samples end
    where training says a turn ends."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return sorted({*gen.stop_token_ids, *eos, *end_of_turn_ids(tokenizer, chat_template)})


@dataclass(frozen=True)
class Sampling:
    """How one prompt set is sampled: the round's (spec.generation) or the evaluation's."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int  # the base seed; each prompt's derives from it (prompt_seed)


def _generate(run: IterativeDPORun, iteration: int, policy: str, tokenizer, formatted: list[FormattedPrompt]):
    gen = run.spec.generation
    how = Sampling(gen.samples_per_prompt, gen.temperature, gen.top_p, gen.max_new_tokens, gen.seed)
    return sample(run, iteration, policy, tokenizer, formatted, how)


def sample(run: IterativeDPORun, iteration: int, policy: str, tokenizer, formatted: list[FormattedPrompt],
           how: Sampling):  # fmt: skip
    """vLLM's outputs for `formatted`, in order, sampled as `how` says; the engine as
    spec.generation sets it up (memory, parallelism, context), stopping where a turn ends."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    gen = run.spec.generation
    max_model_len = run.spec.generation_max_model_len
    llm = LLM(
        model=policy,
        tokenizer=policy,
        seed=how.seed,
        gpu_memory_utilization=gen.gpu_memory_utilization,
        tensor_parallel_size=gen.tensor_parallel_size,
        max_model_len=max_model_len,
        enforce_eager=gen.enforce_eager,
    )
    stop_ids = stop_token_ids(gen, tokenizer, run.spec.policy.chat_template)
    params = [
        SamplingParams(
            n=how.n,
            temperature=how.temperature,
            top_p=how.top_p,
            max_tokens=max(1, min(how.max_new_tokens, max_model_len - len(item.token_ids))),
            stop=list(gen.stop) or None,
            stop_token_ids=stop_ids or None,
            seed=prompt_seed(how.seed, iteration, item.prompt.prompt_id),
        )
        for item in formatted
    ]
    prompts = [TokensPrompt(prompt_token_ids=item.token_ids) for item in formatted]
    try:
        return llm.generate(prompts, params, use_tqdm=False)
    finally:
        del llm  # its engine process goes with it: the memory is free for what runs next


def shard_index(flag: int | None) -> int:
    """--shard, else the Indexed Job's JOB_COMPLETION_INDEX."""
    if flag is not None:
        return flag
    env = os.environ.get("JOB_COMPLETION_INDEX")
    if env is None or not env.isdigit():
        raise UsageError("--shard is required outside an Indexed Job (JOB_COMPLETION_INDEX is unset)")
    return int(env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, type=Path, help="the run file (YAML or JSON)")
    parser.add_argument("--iteration", required=True, type=int, help="round, 1-based")
    parser.add_argument("--shard", type=int, default=None, help="shard index, 0-based (default: JOB_COMPLETION_INDEX)")
    parser.add_argument("--policy", default=None,
                        help="the policy to sample (default: the previous round's checkpoint; the planner sets it "
                             "with spec.evaluation.rollback)")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return stage_main(PROG, lambda: _main(args))


def _main(args: argparse.Namespace) -> None:
    run = load_for_stage(args.spec, args.iteration, Stage.GENERATE)
    shard = shard_index(args.shard)
    shards = run.spec.generation.shards
    if not 0 <= shard < shards:
        raise UsageError(f"--shard: must be in 0..{shards - 1} (spec.generation.shards is {shards}); got {shard}")
    claim_run_folder(run)
    layout, it = RunLayout.of(run), args.iteration
    ledger = open_ledger(layout, it, Stage.GENERATE, process=f"shard-{shard}",
                         reads=[run.spec.prompts_for(it).dataset, args.policy or policy_for(run, it)])  # fmt: skip
    m = run_shard(run, it, shard, args.policy)
    summary = GenerateSummary(shard=m.shard, shards=m.shards, prompts=m.prompts_in, prompts_out=m.prompts_out,
                              samples=m.samples, prompts_left_out=len(m.left_out), seconds=m.seconds)  # fmt: skip
    emit_summary(ledger.stamp(summary, wrote=[layout.shard_file(it, shard, shards)]))
