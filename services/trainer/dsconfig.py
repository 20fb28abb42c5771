"""The DeepSpeed config, as a pure function of the typed TrainingSpec and the world size.

Kept apart from the loop so the batch arithmetic and the precision flags are unit-tested
without starting DeepSpeed.
"""

from __future__ import annotations

from iterdpo.errors import UsageError
from iterdpo.spec import TrainingSpec

GRADIENT_CLIPPING = 1.0


def gradient_accumulation(training: TrainingSpec, world_size: int) -> int:
    per_pass = training.micro_batch_size * world_size
    if training.global_batch_size % per_pass:
        raise UsageError(
            f"training.globalBatchSize ({training.global_batch_size}) is not a multiple of "
            f"microBatchSize x processes = {training.micro_batch_size} x {world_size} = {per_pass}"
        )
    return training.global_batch_size // per_pass


def build_ds_config(training: TrainingSpec, world_size: int) -> dict:
    """DeepSpeed config; batch sizes count PAIRS (each pair is two sequences in one pass).

    The optimizer is DeepSpeed's "AdamW" with torch_adam: it builds torch.optim.AdamW,
    which needs no compiled op (FusedAdam / CPUAdam would build C++/CUDA extensions at
    start-up), so the same config runs on CPU and GPU.
    """
    if training.zero_stage == 0 and training.precision != "fp32":
        # Stage 0 keeps bf16/fp16 training's fp32 master weights inside DeepSpeed's
        # FP16_Optimizer, with no API to read them back; saving the rounded module
        # weights would lose every update smaller than the format's spacing.
        raise UsageError(
            f"training.zeroStage 0 with precision {training.precision} is not supported "
            "(the fp32 master weights could not be saved): use zeroStage 1, 2 or 3, or precision fp32"
        )
    zero: dict = {"stage": training.zero_stage}
    if training.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": training.global_batch_size,
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation(training, world_size),
        "gradient_clipping": GRADIENT_CLIPPING,
        "zero_optimization": zero,
        "bf16": {"enabled": training.precision == "bf16"},
        "fp16": {"enabled": training.precision == "fp16"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": training.learning_rate,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": training.weight_decay,
                "torch_adam": True,
            },
        },
        "steps_per_print": 2**31 - 1,  # the loop logs its own line per step
        "wall_clock_breakdown": False,
    }
