"""iterdpo's Train stage (torchrun, DeepSpeed ZeRO-2, fp32) against TRL's DPOTrainer, side by side.

    .venv/bin/python benchmarks/bench_train.py [--pairs 256] [--epochs 1] [--rounds 3]

Both train the tiny policy on the SAME synthetic pairs (a tiny prompt; a kind-word response
chosen over an unkind-word one), with the same epochs, global batch, learning rate (constant,
no warmup), beta, sigmoid loss, AdamW (0.9, 0.999, eps 1e-8, no weight decay), gradient
clipping 1.0, max length, fp32, no gradient checkpointing:
  iterdpo   `torchrun --nproc-per-node 2 -m iterdpo_trainer --spec RUN --iteration 1`
            (DS_ACCELERATOR=cpu, gloo; 2 processes x 1 thread); the pairs sit where the layout
            puts them (<root>/<name>/iter-01/score/pairs.jsonl). Reference log-probs are computed
            once before training; it writes the HF checkpoint and metrics.json.
  TRL       trl 1.16 DPOTrainer(use_cpu=True) in one process (2 threads), this script's
            `--trl` mode; TRL's defaults otherwise (the reference model runs beside the policy
            every step); saves the model at the end, as iterdpo does.
Both are timed as processes, start to exit, and the rounds interleave the two.
pairs/s = pairs x epochs / wall seconds. Final loss: the mean of the last epoch's step losses.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

SEED = 42


def build_pairs(assets, count: int, words: int, seed: int) -> list[dict]:
    """Pairs in the annotator's pairs.jsonl shape: chosen has kind words, rejected unkind ones."""
    prompts = c.read_prompts(assets)
    rng = random.Random(seed)
    pairs = []
    for i in range(count):
        chosen = c.random_words(rng, words, kind_share=0.3, unkind_share=0.0)
        rejected = c.random_words(rng, words, kind_share=0.0, unkind_share=0.3)
        pairs.append({
            "prompt_id": str(i), "prompt": prompts[i % len(prompts)], "chosen": chosen, "rejected": rejected,
            "chosen_reward": 1.0, "rejected_reward": -1.0, "margin": 2.0,
        })
    return pairs


def write_run_file(path: Path, *, assets, root: Path, args) -> None:
    c.write_run(
        path, "bench-train", policy=assets.policy, reward=assets.reward, prompts=assets.prompts[0], root=root,
        training={
            "loss": {"type": "sigmoid", "beta": args.beta, "labelSmoothing": 0.0},
            "learningRate": args.lr,
            "epochs": args.epochs,
            "scheduler": "constant",
            "warmupRatio": 0.0,
            "weightDecay": 0.0,
            "globalBatchSize": args.batch,
            "microBatchSize": args.batch // args.nproc,
            "nprocPerNode": args.nproc,
            "maxLength": args.max_length,
            "maxPromptLength": args.max_prompt_length,
            "zeroStage": 2,
            "precision": "fp32",
            "gradientCheckpointing": False,
            "seed": SEED,
        },
    )


def trl_train(job_file: Path) -> None:
    """The peer, as a TRL user writes it."""
    job = json.loads(job_file.read_text())
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in Path(job["pairs"]).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([
        {
            "prompt": r["prompt"],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in rows
    ])
    config = DPOConfig(
        output_dir=job["out"],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=job["batch"],
        gradient_accumulation_steps=1,
        num_train_epochs=job["epochs"],
        learning_rate=job["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        beta=job["beta"],
        loss_type=["sigmoid"],
        max_length=job["max_length"],
        seed=SEED,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(job["policy"])
    trainer = DPOTrainer(model=job["policy"], args=config, train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train()
    trainer.save_model(str(Path(job["out"]) / "policy"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps_per_epoch = len(losses) // job["epochs"]
    Path(job["result"]).write_text(json.dumps({
        "train_runtime": result.metrics["train_runtime"],
        "steps": len(losses),
        "final_loss": sum(losses[-steps_per_epoch:]) / steps_per_epoch,
    }))


def run_iterdpo(workdir: Path, assets, pairs: list[dict], args, r: int) -> dict:
    from iterdpo.layout import RunLayout
    from iterdpo.runfile import load_run
    from iterdpo_reward_server.process import free_port

    root = workdir / f"iterdpo-{r}"  # a fresh root: a finished round (metrics.json) would be skipped
    run_file = workdir / f"run-{r}.yaml"
    write_run_file(run_file, assets=assets, root=root, args=args)
    pairs_file = RunLayout.of(load_run(run_file)).pairs_file(1)
    pairs_file.parent.mkdir(parents=True, exist_ok=True)
    pairs_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    argv = [
        c.PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "iterdpo_trainer", "--spec", str(run_file), "--iteration", "1",
    ]
    env = {"DS_ACCELERATOR": "cpu", "ITERDPO_TERMINATION_LOG": str(workdir / f"summary-{r}.json")}
    wall = c.run_timed(argv, log=workdir / f"iterdpo-{r}.log", env=env)
    metrics = json.loads((root / "bench-train" / "iter-01" / "train" / "metrics.json").read_text())
    return {"wall": wall, "final_loss": metrics["final"]["loss"], "steps": len(metrics["steps"]),
            "stage seconds": metrics["seconds"]}


def run_trl(workdir: Path, assets, pairs: list[dict], args, r: int) -> dict:
    pairs_file = workdir / "trl-pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    job = {
        "policy": str(assets.policy), "pairs": str(pairs_file), "out": str(workdir / f"trl-{r}"),
        "result": str(workdir / f"trl-{r}.json"), "batch": args.batch, "epochs": args.epochs, "lr": args.lr,
        "beta": args.beta, "max_length": args.max_length,
    }
    job_file = workdir / f"trl-job-{r}.json"
    job_file.write_text(json.dumps(job))
    wall = c.run_timed([c.PYTHON, __file__, "--trl", str(job_file)], log=workdir / f"trl-{r}.log")
    return {"wall": wall, **json.loads(Path(job["result"]).read_text())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--words", type=int, default=40, help="words per chosen / rejected response")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=8, help="global batch, in pairs")
    p.add_argument("--nproc", type=int, default=2, help="iterdpo's torchrun processes (micro batch = batch / nproc)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-prompt-length", type=int, default=128, help="iterdpo only (TRL 1.16 has no such setting)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; each runs both once, in turn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=Path, help="keep the work files and logs in this folder (default: a temp dir, removed)")
    p.add_argument("--trl", type=Path, help=argparse.SUPPRESS)  # internal: the TRL peer's own process
    args = p.parse_args()
    if args.trl:
        trl_train(args.trl)
        return 0
    if args.batch % args.nproc:
        p.error("--batch must be a multiple of --nproc")

    c.print_header(
        "train stage: DPO pairs/s, process start to exit",
        {k: getattr(args, k) for k in ("pairs", "words", "epochs", "batch", "nproc", "lr", "beta", "max_length", "rounds")},
    )
    runs: dict[str, list[dict]] = {"iterdpo": [], "trl": []}
    with c.workdir(args.keep, prefix="iterdpo-bench-train-") as workdir:
        assets = c.tiny_assets(workdir)
        pairs = build_pairs(assets, args.pairs, args.words, args.seed)
        systems = [("iterdpo", run_iterdpo), ("trl", run_trl)]
        for r in range(args.rounds):
            for name, run in c.rotate(systems, r):
                runs[name].append(run(workdir, assets, pairs, args, r))
            c.step(f"round {r + 1}/{args.rounds}: iterdpo {runs['iterdpo'][-1]['wall']:.1f} s, TRL {runs['trl'][-1]['wall']:.1f} s")
    report(runs, args)
    return 0


def report(runs: dict[str, list[dict]], args) -> None:
    work = args.pairs * args.epochs
    iterdpo = c.Samples([work / x["wall"] for x in runs["iterdpo"]])
    trl = c.Samples([work / x["wall"] for x in runs["trl"]])
    loss = {k: c.Samples([x["final_loss"] for x in v]) for k, v in runs.items()}
    print()
    c.print_table(
        ["system", "wall s median (min-max)", "pairs/s median (min-max)", "vs iterdpo (per-round)", "steps", "final loss"],
        [
            ["iterdpo (torchrun x2, ZeRO-2, fp32)", c.Samples([x["wall"] for x in runs["iterdpo"]]).text("{:.1f}"),
             iterdpo.text("{:.1f}"), "1.00x", str(runs["iterdpo"][-1]["steps"]), loss["iterdpo"].text("{:.4f}")],
            ["TRL 1.16 DPOTrainer (1 process, fp32)", c.Samples([x["wall"] for x in runs["trl"]]).text("{:.1f}"),
             trl.text("{:.1f}"), c.paired_ratio(trl, iterdpo).text("{:.2f}x"), str(runs["trl"][-1]["steps"]),
             loss["trl"].text("{:.4f}")],
        ],
    )
    trl_loop = c.Samples([x["train_runtime"] for x in runs["trl"]])
    stage = c.Samples([x["stage seconds"] for x in runs["iterdpo"]])
    print(f"\nTRL's own train_runtime (trainer.train() only): {trl_loop.text('{:.1f}')} s"
          f" = {work / trl_loop.median:.0f} pairs/s inside the loop")
    print(f"iterdpo's own stage seconds (metrics.json; from main() to metrics, reference pass and save included): "
          f"{stage.text('{:.1f}')} s")
    print(f"final loss: the mean step loss of the last epoch; ln 2 = {0.6931:.4f} is where DPO starts")
    print("ratio > 1: TRL trains more pairs/s than iterdpo")


if __name__ == "__main__":
    sys.exit(main())
