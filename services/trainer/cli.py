"""Command line of the train stage.

    DS_ACCELERATOR=cpu torchrun --nproc-per-node P -m iterdpo_trainer --spec RUN_FILE --iteration T

(on GPUs, without DS_ACCELERATOR). Run without torchrun it trains as one process.
Errors end every rank with one line naming the problem: exit 2 for bad input (the
flags, the run file), 1 for a stage that cannot finish (`iterdpo.errors`).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
import warnings

from iterdpo.errors import stage_main
from iterdpo.layout import RunLayout, claim_run_folder, policy_for, reference_for
from iterdpo.lineage import open_ledger
from iterdpo.runfile import load_for_stage
from iterdpo.stages import Stage
from iterdpo.summary import emit_summary

log = logging.getLogger("iterdpo_trainer")
PROG = "iterdpo_trainer"


def parse_args(argv: list[str] | None, *, prog: str = PROG, description: str = "", first_round: int = 1,
               start_policy: bool = False) -> argparse.Namespace:  # fmt: skip
    parser = argparse.ArgumentParser(prog=prog, description=description or (
        "Train stage of one round of iterative DPO: DPO on the round's pairs with DeepSpeed; "
        "writes <round>/train/policy (Hugging Face checkpoint) and metrics.json."))  # fmt: skip
    parser.add_argument("--spec", required=True, help="run file (YAML or JSON IterativeDPORun)")
    parser.add_argument("--iteration", required=True, type=int, help=f"round number, from {first_round}")
    if start_policy:
        parser.add_argument("--policy", default=None,
                            help="the policy the round starts from (default: the previous round's checkpoint; the "
                                 "planner sets it with spec.evaluation.rollback)")  # fmt: skip
    return parser.parse_args(argv)


def _single_process_defaults() -> None:
    """Without torchrun: a world of one on a free local port."""
    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _configure_logging(rank: int, label: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[{label} rank {rank}] %(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("DeepSpeed", "torch.distributed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # DeepSpeed 0.19 calls a torch collective torch has renamed; the warning is not ours to fix.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars, one per rank and model


def main(argv: list[str] | None = None) -> int:
    return launch(parse_args(argv, start_policy=True), PROG, _main)


def launch(args: argparse.Namespace, prog: str, body, *, label: str = "train") -> int:
    """Run a training stage's `body(args, rank=, world_size=, started=)` on this rank: the
    process group's defaults without torchrun, logging per rank, one error line per rank."""
    started = time.monotonic()
    _single_process_defaults()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _configure_logging(rank, label)
    try:
        return stage_main(f"{prog} (rank {rank})", lambda: body(args, rank=rank, world_size=world_size, started=started))
    finally:
        _leave_process_group()


def run_once(args: argparse.Namespace, stage: Stage, *, rank: int, finished, summary_of, work, what: str,
             reads) -> int:  # fmt: skip
    """A training stage that runs once (round 0: SFT, RewardModel): load and claim the run, skip
    what is finished (its metrics marker and checkpoint exist: `finished(run)`), else
    `work(run)` -> metrics; rank 0 records the lineage (`reads(run)`, the checkpoint) and
    reports `summary_of(metrics)` either way."""
    run = load_for_stage(args.spec, args.iteration, stage)
    claim_run_folder(run)
    ledger = open_ledger(RunLayout.of(run), args.iteration, stage, reads=reads(run)) if rank == 0 else None
    metrics = finished(run)
    if metrics is not None:
        log.info("%s is already trained (%s): nothing to do", what, metrics.checkpoint)
    else:
        metrics = work(run)
    if ledger is not None:
        emit_summary(ledger.stamp(summary_of(metrics), wrote=[metrics.checkpoint]))
    return 0


def _leave_process_group() -> None:
    """Tear the process group down ourselves (NCCL warns at exit otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _main(args: argparse.Namespace, *, rank: int, world_size: int, started: float) -> int:
    from iterdpo_trainer import train

    run = load_for_stage(args.spec, args.iteration, Stage.TRAIN)
    claim_run_folder(run)
    it, layout = args.iteration, RunLayout.of(run)
    policy = args.policy or policy_for(run, it)
    reads = [layout.pairs_file(it), policy, reference_for(run, it, policy)]
    ledger = open_ledger(layout, it, Stage.TRAIN, reads=reads) if rank == 0 else None
    metrics = train.finished_metrics(run, it)
    if metrics is not None:
        log.info("round %d is already trained (%s): nothing to do", it, metrics.checkpoint)
    else:
        metrics = train.train(train.prepare(run, it, world_size, policy), started=started)
    if ledger is not None:
        emit_summary(ledger.stamp(train.summary_of(metrics), wrote=[metrics.checkpoint]))
    return 0
