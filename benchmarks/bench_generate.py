"""iterdpo's Generate stage end to end, against raw vLLM in a fresh process, side by side.

    .venv/bin/python benchmarks/bench_generate.py [--prompts 64] [--samples 4] [--max-new-tokens 32] [--rounds 3]

Systems (same tiny policy, same prompts, n, max tokens, temperature 1, enforce_eager, same
vLLM memory share and context length):
  iterdpo   `python -m iterdpo_generator --spec RUN --iteration 1 --shard 0` on a run file written
            to a temp dir: spec validation, prompt loading with accounting, the policy's chat
            template, per-prompt seeds, vLLM, the atomic shard file and its .done.json marker
  raw vLLM  the same script's `--raw-vllm` mode in a fresh process: read the JSONL, apply the
            chat template, LLM(...).generate(texts, SamplingParams(n=K)), write a JSONL
Both are timed as processes, start to exit (wall seconds); the rounds interleave the two,
so both see the same background load. The point is the stage's overhead on top of vLLM.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

GPU_MEMORY_UTILIZATION = 0.2  # vLLM's CPU build: share of host memory for the KV cache
SEED = 42


def write_prompts(assets, count: int, path: Path) -> None:
    """`count` prompts taken in turn from the tiny prompt sets."""
    prompts = c.read_prompts(assets)
    with open(path, "w") as fh:
        for i in range(count):
            fh.write(json.dumps({"messages": prompts[i % len(prompts)]}) + "\n")


def write_run_file(path: Path, *, policy: Path, reward: Path, prompts: Path, root: Path, args) -> None:
    c.write_run(
        path, "bench-generate", policy=policy, reward=reward, prompts=prompts, root=root,
        generation={
            "samplesPerPrompt": args.samples,
            "temperature": 1.0,
            "topP": 1.0,
            "maxNewTokens": args.max_new_tokens,
            "seed": SEED,
            "shards": 1,
            "gpuMemoryUtilization": GPU_MEMORY_UTILIZATION,
            "enforceEager": True,
            "maxModelLen": args.max_model_len,
        },
        # Generation leaves out prompts longer than maxPromptLength; the tiny ones are far shorter.
        training={"maxLength": args.max_model_len, "maxPromptLength": args.max_model_len - args.max_new_tokens},
    )


def raw_vllm(job_file: Path) -> None:
    """The peer, as a vLLM user writes it: no spec, no accounting, no atomic writes."""
    t0 = time.monotonic()
    job = json.loads(job_file.read_text())
    from vllm import LLM, SamplingParams

    t1 = time.monotonic()
    llm = LLM(
        model=job["policy"],
        seed=SEED,
        gpu_memory_utilization=GPU_MEMORY_UTILIZATION,
        max_model_len=job["max_model_len"],
        enforce_eager=True,
    )
    t2 = time.monotonic()
    tokenizer = llm.get_tokenizer()
    with open(job["prompts"]) as fh:
        conversations = [json.loads(line)["messages"] for line in fh if line.strip()]
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations]
    params = SamplingParams(n=job["samples"], temperature=1.0, top_p=1.0, max_tokens=job["max_new_tokens"])
    outputs = llm.generate(texts, params, use_tqdm=False)
    t3 = time.monotonic()
    with open(job["out"], "w") as fh:
        for messages, out in zip(conversations, outputs):
            fh.write(json.dumps({"prompt": messages, "responses": [o.text for o in out.outputs]}) + "\n")
    t4 = time.monotonic()
    phases = {"import vllm": t1 - t0, "LLM()": t2 - t1, "template + generate": t3 - t2, "write": t4 - t3}
    tokens = sum(len(o.token_ids) for out in outputs for o in out.outputs)
    Path(job["result"]).write_text(json.dumps({"phases": phases, "tokens": tokens, "samples": len(outputs) * job["samples"]}))


def run_iterdpo(workdir: Path, assets, prompts: Path, args, r: int) -> dict:
    root = workdir / f"iterdpo-{r}"
    run_file = workdir / f"run-{r}.yaml"
    write_run_file(run_file, policy=assets.policy, reward=assets.reward, prompts=prompts, root=root, args=args)
    summary_file = workdir / f"summary-{r}.json"
    argv = [c.PYTHON, "-m", "iterdpo_generator", "--spec", str(run_file), "--iteration", "1", "--shard", "0"]
    wall = c.run_timed(argv, log=workdir / f"iterdpo-{r}.log", env={"ITERDPO_TERMINATION_LOG": str(summary_file)})
    summary = json.loads(summary_file.read_text())
    shard = root / "bench-generate" / "iter-01" / "generate" / "shard-00000-of-00001.jsonl"
    records = [json.loads(line) for line in shard.read_text().splitlines() if line.strip()]
    tokens = sum(sum(rec["response_tokens"]) for rec in records)
    return {"wall": wall, "stage seconds": summary["seconds"], "samples": summary["samples"], "tokens": tokens}


def run_raw(workdir: Path, assets, prompts: Path, args, r: int) -> dict:
    job = {
        "policy": str(assets.policy), "prompts": str(prompts), "samples": args.samples,
        "max_new_tokens": args.max_new_tokens, "max_model_len": args.max_model_len,
        "out": str(workdir / f"raw-{r}.jsonl"), "result": str(workdir / f"raw-{r}.json"),
    }
    job_file = workdir / f"raw-job-{r}.json"
    job_file.write_text(json.dumps(job))
    wall = c.run_timed([c.PYTHON, __file__, "--raw-vllm", str(job_file)], log=workdir / f"raw-{r}.log")
    result = json.loads(Path(job["result"]).read_text())
    return {"wall": wall, **result}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64, help="prompts generated for")
    p.add_argument("--samples", type=int, default=4, help="responses per prompt (K, vLLM's n)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=128, help="vLLM context length (iterdpo: training.maxLength)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; each runs both once, in turn")
    p.add_argument("--keep", type=Path, help="keep the work files and logs in this folder (default: a temp dir, removed)")
    p.add_argument("--raw-vllm", type=Path, help=argparse.SUPPRESS)  # internal: the peer's own process
    args = p.parse_args()
    if args.raw_vllm:
        raw_vllm(args.raw_vllm)
        return 0

    c.print_header(
        "generate stage: wall seconds, process start to exit",
        {k: getattr(args, k) for k in ("prompts", "samples", "max_new_tokens", "max_model_len", "rounds")},
    )
    runs: dict[str, list[dict]] = {"iterdpo": [], "raw": []}
    with c.workdir(args.keep, prefix="iterdpo-bench-generate-") as workdir:
        assets = c.tiny_assets(workdir)
        prompts = workdir / "prompts.jsonl"
        write_prompts(assets, args.prompts, prompts)
        systems = [("iterdpo", run_iterdpo), ("raw", run_raw)]
        for r in range(args.rounds):
            for name, run in c.rotate(systems, r):
                runs[name].append(run(workdir, assets, prompts, args, r))
            c.step(f"round {r + 1}/{args.rounds}: iterdpo {runs['iterdpo'][-1]['wall']:.1f} s, raw vLLM {runs['raw'][-1]['wall']:.1f} s")
    return 0 if report(runs, args) else 1


def report(runs: dict[str, list[dict]], args) -> bool:
    """Print the table; False if a system did not produce every sample."""
    iterdpo = c.Samples([x["wall"] for x in runs["iterdpo"]])
    raw = c.Samples([x["wall"] for x in runs["raw"]])
    overhead = c.Samples([a - b for a, b in zip(iterdpo.values, raw.values)])
    expected = args.prompts * args.samples
    print()
    c.print_table(
        ["system", "wall s median (min-max)", "samples", "tokens generated (last round)", "vs raw vLLM (per-round)"],
        [
            ["iterdpo generate stage", iterdpo.text("{:.1f}"), str(runs["iterdpo"][-1]["samples"]),
             str(runs["iterdpo"][-1]["tokens"]), c.paired_ratio(iterdpo, raw).text("{:.2f}x")],
            ["raw vLLM LLM.generate", raw.text("{:.1f}"), str(runs["raw"][-1]["samples"]),
             str(runs["raw"][-1]["tokens"]), "1.00x"],
        ],
    )
    print(f"\niterdpo overhead per shard: {overhead.text('{:+.1f}')} s (iterdpo wall - raw wall, per round)")
    stage = c.Samples([x["stage seconds"] for x in runs["iterdpo"]])
    print(f"iterdpo's own stage seconds (its summary; from run_shard's start, imports excluded): {stage.text('{:.1f}')}")
    last = runs["raw"][-1]
    phases = {**last["phases"], "the rest (interpreter start, exit with vLLM's shutdown)": last["wall"] - sum(last["phases"].values())}
    print("raw vLLM phases (last round): " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
    complete = all(x["samples"] == expected for x in runs["iterdpo"] + runs["raw"])
    if not complete:
        print(f"!! a system did not produce {expected} samples")
    print("ratio > 1: iterdpo's stage takes longer than raw vLLM")
    return complete


if __name__ == "__main__":  # vLLM spawns workers: the guard is required
    sys.exit(main())
