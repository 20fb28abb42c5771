"""iterdpo's RewardModel stage (torchrun, DeepSpeed ZeRO-2, fp32) against TRL's RewardTrainer, side by side.

    .venv/bin/python benchmarks/bench_reward_model.py [--pairs 1024] [--epochs 1] [--rounds 3] [--peer-site DIR]

Both train a Bradley-Terry reward model on the tiny preference set (`iterdpo.tiny`'s
preferences.jsonl: the report's implicit format, whole conversations, chosen = the side the
hand-wired gold reward model scores higher), the first `--pairs` rows, from the SAME base: a
sequence-classification checkpoint made once from the tiny policy (a one-label score head
drawn with a fixed seed, config.pad_token_id set, saved with the policy's tokenizer), so both
start from identical weights, score head included. Same epochs, global batch, learning rate
(constant, no warmup), AdamW (0.9, 0.999, eps 1e-8, no weight decay), gradient clipping 1.0
(iterdpo's DeepSpeed config), max length 256, fp32 (TRL's default would be bf16), no gradient
checkpointing (TRL's default would be on), no held-out evaluation on either side (heldOutShare
0; TRL gets no eval_dataset):
  iterdpo   `torchrun --nproc-per-node 2 -m iterdpo_trainer.reward_model --spec RUN --iteration 0`
            (DS_ACCELERATOR=cpu, gloo; 2 processes x 1 thread); a run file with
            spec.reward.training and no spec.reward.model. It tokenizes (bt.render / bt.encode:
            the base's chat template, no generation prompt), trains, writes the HF checkpoint,
            then metrics.json.
  TRL       trl 1.16 RewardTrainer(use_cpu=True) in one process (2 threads), this script's
            `--trl` mode, on the same rows as a conversational dataset (chosen / rejected
            message lists) that TRL tokenizes itself (apply_chat_template, tokenize=True);
            saves the model at the end, as iterdpo does. The loss is TRL's plain one:
            center_rewards_coefficient None (its default; no centring term) and no `margin`
            column (the tiny set's `gold_margin` is not named `margin`, so iterdpo subtracts
            none either). TRL's disable_dropout (default True) changes nothing here: the tiny
            Llama has no dropout.
The token ids are checked to be the same: TRL's tokenized dataset (chosen_ids / rejected_ids)
is compared, pair by pair, with what iterdpo's bt.encode_pairs gives with the stage's tokenizer.
Both are timed as processes, start to exit, and the rounds interleave the two in rotated order.
pairs/s = pairs x epochs / wall seconds. Final loss: the mean of the last epoch's step losses.

The step-1 check: one more short run of each, on `--check-pairs` pairs with ONE optimizer step
per epoch covering all of them (global batch = the pairs; iterdpo 2 x micro batch half) and 2
epochs. The step-1 loss is then the mean BT loss of every pair under the initial weights, which
no shuffling order changes: the two must agree within 1e-4 (fp32), or this script exits 1. The
step-2 loss (after one AdamW step on the same gradient) is printed too, as a check of the
optimizer settings, but does not fail the script.

TRL is not a dependency of iterdpo's venv: `--peer-site DIR` is a folder with trl 1.16 and
accelerate 1.15, put on PYTHONPATH for the TRL process only; default: the interpreter's own trl.
    .venv/bin/pip install --target /tmp/trl-site --no-deps trl==1.16.0 accelerate==1.15.0
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

SEED = 42
HEAD_SEED = 1234  # the score head of the shared base
NAME = "bench-rm"
LOSS_TOLERANCE = 1e-4
INSTALL = ".venv/bin/pip install --target /tmp/trl-site --no-deps trl==1.16.0 accelerate==1.15.0"


# --- the shared base and the data ------------------------------------------------------------


def build_base(policy: Path, out: Path) -> Path:
    """A one-label sequence-classification checkpoint of the tiny policy, seeded head, pad id set."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(policy))
    torch.manual_seed(HEAD_SEED)
    model = AutoModelForSequenceClassification.from_pretrained(str(policy), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_preferences(assets, path: Path, count: int) -> int:
    """The first `count` rows of the tiny preference set, as they are (iterdpo's input)."""
    lines = [line for line in assets.preferences.read_text().splitlines() if line.strip()][:count]
    path.write_text("".join(line + "\n" for line in lines))
    return len(lines)


def iterdpo_ids(base: Path, preferences: Path, max_length: int) -> list[list[list[int]]]:
    """[[chosen ids, rejected ids], ...] as the stage encodes them (its tokenizer, bt.encode_pairs)."""
    from iterdpo_trainer import bt
    from iterdpo_trainer.preferences import PreferenceSource, read_preferences
    from iterdpo_trainer.rm_train import load_tokenizer

    read = read_preferences(PreferenceSource(dataset=str(preferences), format="auto"), field_path="data")
    encoded = bt.encode_pairs(load_tokenizer(base), read.pairs, max_length=max_length)
    if read.left_out or encoded.unusable or encoded.truncated:
        raise SystemExit(f"iterdpo leaves out or truncates pairs ({len(read.left_out)} rows, "
                         f"{len(encoded.unusable)} unusable, {encoded.truncated} truncated): not a like-for-like set")
    return [[p.chosen.ids, p.rejected.ids] for p in encoded.pairs]


# --- the iterdpo side ---------------------------------------------------------------------------


def write_run_file(path: Path, *, assets, base: Path, preferences: Path, root: Path, pairs: int, batch: int,
                   epochs: int, args) -> None:
    """A run whose only stage before round 1 is the RewardModel stage (`_common.write_run` always
    sets spec.reward.model, which a run with reward.training must not have)."""
    import yaml

    run = {
        "apiVersion": "iterdpo.io/v1alpha1",
        "kind": "IterativeDPORun",
        "metadata": {"name": NAME},
        "spec": {
            "iterations": 1,
            "policy": {"model": str(assets.policy)},
            "prompts": {"dataset": str(assets.prompts[0])},
            "reward": {
                "maxLength": args.max_length,
                "training": {
                    "base": str(base),
                    "data": {"dataset": str(preferences), "maxPairs": pairs},
                    "heldOutShare": 0.0,
                    "learningRate": args.lr,
                    "epochs": epochs,
                    "scheduler": "constant",
                    "warmupRatio": 0.0,
                    "weightDecay": 0.0,
                    "globalBatchSize": batch,
                    "microBatchSize": batch // args.nproc,
                    "nprocPerNode": args.nproc,
                    "zeroStage": 2,
                    "precision": "fp32",
                    "gradientCheckpointing": False,
                    "seed": SEED,
                },
            },
            # Not read by this stage, but every stage program checks the whole run against the
            # local models: the defaults (2048 tokens) exceed the tiny policy's 1024.
            "generation": {"maxModelLen": 512},
            "training": {"maxLength": 256, "maxPromptLength": 128},
            "storage": {"root": str(root)},
        },
    }
    path.write_text(yaml.safe_dump(run, sort_keys=False))


def run_iterdpo(workdir: Path, job: dict, tag: str) -> dict:
    from iterdpo.contracts import RewardModelMetrics, read_model
    from iterdpo_reward_server.process import free_port

    root = workdir / f"iterdpo-{tag}"  # a fresh root: a finished stage (metrics.json) would be skipped
    run_file = workdir / f"run-{tag}.yaml"
    write_run_file(run_file, assets=job["assets"], base=job["base"], preferences=job["preferences"], root=root,
                   pairs=job["pairs"], batch=job["batch"], epochs=job["epochs"], args=job["args"])
    argv = [
        c.PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", str(job["args"].nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "iterdpo_trainer.reward_model", "--spec", str(run_file), "--iteration", "0",
    ]
    env = {"DS_ACCELERATOR": "cpu", "ITERDPO_TERMINATION_LOG": str(workdir / f"summary-{tag}.json")}
    wall = c.run_timed(argv, log=workdir / f"iterdpo-{tag}.log", env=env)
    metrics = read_model(root / NAME / "iter-00" / "reward_model" / "metrics.json", RewardModelMetrics)
    return {"wall": wall, "losses": [s.loss for s in metrics.steps], "final_loss": metrics.final_loss,
            "steps": len(metrics.steps), "pairs": metrics.pairs, "stage seconds": metrics.seconds}


# --- the TRL side -------------------------------------------------------------------------------


def trl_train(job_file: Path) -> None:
    """The peer, as a TRL user writes it (plus a record of each step's unrounded loss)."""
    job = json.loads(job_file.read_text())
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    rows = [json.loads(line) for line in Path(job["preferences"]).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    config = RewardConfig(
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
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        optim="adamw_torch",
        max_length=job["max_length"],
        center_rewards_coefficient=None,
        seed=SEED,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(job["base"])
    trainer = RewardTrainer(model=job["base"], args=config, train_dataset=dataset, processing_class=tokenizer)
    if job.get("ids"):
        data = trainer.train_dataset
        Path(job["ids"]).write_text(json.dumps([[list(a), list(b)] for a, b in zip(data["chosen_ids"], data["rejected_ids"])]))
    result = trainer.train()
    trainer.save_model(str(Path(job["out"]) / "model"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps_per_epoch = len(losses) // job["epochs"]
    Path(job["result"]).write_text(json.dumps({
        "train_runtime": result.metrics["train_runtime"],
        "steps": len(losses),
        "losses": losses,
        "final_loss": sum(losses[-steps_per_epoch:]) / steps_per_epoch,
        "pairs": len(trainer.train_dataset),
    }))


def run_trl(workdir: Path, job: dict, tag: str) -> dict:
    spec = {
        "base": str(job["base"]), "preferences": str(job["preferences"]), "out": str(workdir / f"trl-{tag}"),
        "result": str(workdir / f"trl-{tag}.json"), "batch": job["batch"], "epochs": job["epochs"],
        "lr": job["args"].lr, "max_length": job["args"].max_length,
        "ids": str(workdir / f"trl-ids-{tag}.json") if job.get("ids") else None,
    }
    job_file = workdir / f"trl-job-{tag}.json"
    job_file.write_text(json.dumps(spec))
    wall = c.run_timed([c.PYTHON, __file__, "--trl", str(job_file)], log=workdir / f"trl-{tag}.log",
                       env=job["peer_env"])
    out = {"wall": wall, **json.loads(Path(spec["result"]).read_text())}
    if spec["ids"]:
        out["ids"] = json.loads(Path(spec["ids"]).read_text())
    return out


def peer_env(site: Path | None) -> dict:
    """PYTHONPATH for the TRL process: the peer site first; checked to hold trl 1.16 and to
    shadow nothing this interpreter already has (torch, transformers, datasets stay the venv's)."""
    import subprocess

    env = {}
    if site is None:
        if importlib.util.find_spec("trl") is None:
            raise SystemExit(f"trl is not importable here: install it apart from the venv and pass --peer-site:\n"
                             f"  {INSTALL}\n  .venv/bin/python benchmarks/bench_reward_model.py --peer-site /tmp/trl-site")
    else:
        site = site.resolve()
        if not site.is_dir():
            raise SystemExit(f"--peer-site {site}: no such folder (make it with: {INSTALL})")
        shadowed = sorted(
            p.name for p in site.iterdir()
            if not p.name.endswith((".dist-info", ".egg-info")) and p.name not in ("bin", "__pycache__")
            and importlib.util.find_spec(p.name.removesuffix(".py")) is not None
        )
        if shadowed:
            raise SystemExit(f"--peer-site {site} shadows packages this venv already has: {', '.join(shadowed)}")
        env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    probe = subprocess.run(
        [c.PYTHON, "-c", "import trl, accelerate, torch, transformers, datasets; print(trl.__version__, "
         "accelerate.__version__, torch.__version__, transformers.__version__, datasets.__version__)"],
        capture_output=True, text=True, env={**os.environ, **env},
    )
    if probe.returncode != 0:
        raise SystemExit(f"the TRL peer does not import:\n{probe.stderr[-2000:]}\ninstall it with: {INSTALL}")
    versions = probe.stdout.split()
    if versions[0] != "1.16.0":
        print(f"warning: trl {versions[0]}, not the 1.16.0 this benchmark was written for", flush=True)
    env["_versions"] = versions
    return env


# --- main ------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=1024, help="preference pairs (the tiny set has 1024)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=32, help="global batch, in pairs")
    p.add_argument("--nproc", type=int, default=2, help="iterdpo's torchrun processes (micro batch = batch / nproc)")
    p.add_argument("--lr", type=float, default=1e-3, help="as examples/tiny-local.yaml (tiny random model)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--check-pairs", type=int, default=64, help="pairs of the step-1 loss check (one step per epoch)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; each runs both once, in turn")
    p.add_argument("--peer-site", type=Path,
                   help="folder with trl + accelerate (pip install --target), put on PYTHONPATH for the TRL "
                   "process only (default: this interpreter's trl)")
    p.add_argument("--keep", type=Path, help="keep the work files and logs in this folder (default: a temp dir, removed)")
    p.add_argument("--trl", type=Path, help=argparse.SUPPRESS)  # internal: the TRL peer's own process
    args = p.parse_args()
    if args.trl:
        trl_train(args.trl)
        return 0
    if args.batch % args.nproc or args.check_pairs % args.nproc:
        p.error("--batch and --check-pairs must be multiples of --nproc")
    if args.pairs % args.batch:
        p.error("--pairs must be a multiple of --batch (iterdpo repeats pairs to fill a last step; TRL does not)")

    env = peer_env(args.peer_site)
    versions = env.pop("_versions")
    c.print_header(
        "reward-model stage: Bradley-Terry pairs/s, process start to exit",
        {**{k: getattr(args, k) for k in ("pairs", "epochs", "batch", "nproc", "lr", "max_length", "check_pairs",
                                           "rounds")},
         "trl": versions[0], "accelerate": versions[1], "torch": versions[2], "transformers": versions[3]},
    )
    failures: list[str] = []
    runs: dict[str, list[dict]] = {"iterdpo": [], "trl": []}
    with c.workdir(args.keep, prefix="iterdpo-bench-rm-") as workdir:
        assets = c.tiny_assets(workdir)
        base = build_base(assets.policy, workdir / "base")
        preferences = workdir / "preferences.jsonl"
        if write_preferences(assets, preferences, args.pairs) != args.pairs:
            p.error(f"--pairs {args.pairs}: the tiny set has fewer rows")
        check_preferences = workdir / "check-preferences.jsonl"
        write_preferences(assets, check_preferences, args.check_pairs)
        common = {"assets": assets, "base": base, "args": args, "peer_env": env}

        # Step-1 check: one step per epoch over every pair, both sides; the token ids compared too.
        check = {**common, "preferences": check_preferences, "pairs": args.check_pairs, "batch": args.check_pairs,
                 "epochs": 2}
        c.step(f"step-1 loss check: {args.check_pairs} pairs in one step per epoch, 2 epochs")
        check_iterdpo = run_iterdpo(workdir, check, "check")
        check_trl = run_trl(workdir, {**check, "ids": True}, "check")
        ours = iterdpo_ids(base, check_preferences, args.max_length)
        same_ids = sum(a == b for a, b in zip(ours, check_trl["ids"]))
        if len(ours) != len(check_trl["ids"]) or same_ids != len(ours):
            failures.append(f"token ids differ: {same_ids} of {len(ours)} iterdpo pairs equal TRL's "
                            f"({len(check_trl['ids'])} pairs)")
        first = ours[0][0]
        print(f"   token ids: {same_ids}/{len(ours)} pairs identical (chosen and rejected); pair 0 chosen, "
              f"{len(first)} ids: {first[:12]}{' ...' if len(first) > 12 else ''}", flush=True)
        # The timing runs' pairs: the stage's encoding of all of them (TRL's conversational path was just
        # shown to give the same ids on the check pairs; here: same count, nothing truncated or left out).
        timing_pairs = len(iterdpo_ids(base, preferences, args.max_length))

        timing = {**common, "preferences": preferences, "pairs": args.pairs, "batch": args.batch,
                  "epochs": args.epochs}
        systems = [("iterdpo", run_iterdpo), ("trl", run_trl)]
        for r in range(args.rounds):
            for name, run in c.rotate(systems, r):
                runs[name].append(run(workdir, timing, str(r)))
            c.step(f"round {r + 1}/{args.rounds}: iterdpo {runs['iterdpo'][-1]['wall']:.1f} s, "
                   f"TRL {runs['trl'][-1]['wall']:.1f} s")
        for name, done in runs.items():
            trained = {x["pairs"] for x in done}
            if trained != {timing_pairs}:
                failures.append(f"{name} trained on {sorted(trained)} pairs, not {timing_pairs}")
    report(runs, check_iterdpo, check_trl, args, failures)
    return 1 if failures else 0


def report(runs: dict[str, list[dict]], check_iterdpo: dict, check_trl: dict, args, failures: list[str]) -> None:
    work = args.pairs * args.epochs
    iterdpo = c.Samples([work / x["wall"] for x in runs["iterdpo"]])
    trl = c.Samples([work / x["wall"] for x in runs["trl"]])
    ratio = c.paired_ratio(trl, iterdpo)
    loss = {k: c.Samples([x["final_loss"] for x in v]) for k, v in runs.items()}
    print()
    c.print_table(
        ["system", "wall s median (min-max)", "pairs/s median (min-max)", "vs iterdpo (per-round)", "steps", "final loss"],
        [
            ["iterdpo RewardModel stage (torchrun x2, ZeRO-2, fp32)", c.Samples([x["wall"] for x in runs["iterdpo"]]).text("{:.1f}"),
             iterdpo.text("{:.1f}"), "1.00x", str(runs["iterdpo"][-1]["steps"]), loss["iterdpo"].text("{:.4f}")],
            ["TRL 1.16 RewardTrainer (1 process, fp32)", c.Samples([x["wall"] for x in runs["trl"]]).text("{:.1f}"),
             trl.text("{:.1f}"), ratio.text("{:.2f}x"), str(runs["trl"][-1]["steps"]), loss["trl"].text("{:.4f}")],
        ],
    )
    trl_loop = c.Samples([x["train_runtime"] for x in runs["trl"]])
    stage = c.Samples([x["stage seconds"] for x in runs["iterdpo"]])
    print(f"\nTRL's own train_runtime (trainer.train() only): {trl_loop.text('{:.1f}')} s"
          f" = {work / trl_loop.median:.0f} pairs/s inside the loop")
    print(f"iterdpo's own stage seconds (metrics.json; from main() to metrics, tokenizing and save included): "
          f"{stage.text('{:.1f}')} s")
    print("final loss: the mean step loss of the last epoch; ln 2 = 0.6931 is where an untrained pair sits")

    s1 = (check_iterdpo["losses"][0], check_trl["losses"][0])
    s2 = (check_iterdpo["losses"][1], check_trl["losses"][1])
    d1, d2 = abs(s1[0] - s1[1]), abs(s2[0] - s2[1])
    print(f"\nstep-1 loss over all {args.check_pairs} check pairs (initial weights): iterdpo {s1[0]:.7f}, "
          f"TRL {s1[1]:.7f}, |difference| {d1:.2e} (tolerance {LOSS_TOLERANCE:g})")
    print(f"step-2 loss (after one AdamW step, clipping 1.0; informational): iterdpo {s2[0]:.7f}, TRL {s2[1]:.7f}, "
          f"|difference| {d2:.2e}")
    if not d1 <= LOSS_TOLERANCE:
        failures.append(f"step-1 losses differ by {d1:.2e} > {LOSS_TOLERANCE:g}")
    print("ratio > 1: TRL trains more pairs/s than iterdpo")
    for failure in failures:
        print(f"!! WRONG: {failure}")
    verdict = "FAILED" if failures else "ok"
    print(f"\nresult: {verdict}: reward model, {args.pairs} pairs x {args.epochs} epoch(s): iterdpo "
          f"{iterdpo.median:.1f} pairs/s, TRL {trl.median:.1f} pairs/s, TRL/iterdpo {ratio.text('{:.2f}x')}; "
          f"step-1 loss iterdpo {s1[0]:.6f} vs TRL {s1[1]:.6f} (|diff| {d1:.1e})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
