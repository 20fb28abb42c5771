"""Write the trained policy as a Hugging Face checkpoint that the next round loads as is.

The next round's vLLM generation and `AutoModelForCausalLM.from_pretrained` read the
folder directly, so it holds weights (safetensors, in the policy's original dtype),
config, generation config, tokenizer and the chat template actually trained with.
Written to a temporary sibling folder and renamed, so it is either whole or absent.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from iterdpo.atomic import atomic_path

log = logging.getLogger(__name__)


def full_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Whole weights on rank 0 (None elsewhere); collective, every rank must call it.

    Parameters come from the optimizer's fp32 master copy, not from the module: under
    bf16 the module holds rounded weights, and an update smaller than bf16's spacing
    (lr 5e-7 on a weight near 1) shows only in the master copy. Under ZeRO-3 each
    parameter is gathered from its partitions in turn (the same order on every rank).
    Tied parameters (one tensor, two names) are gathered once and kept under both names.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    rank = dist.get_rank()
    state: dict[str, torch.Tensor] = {}
    gathered: dict[int, torch.Tensor] = {}
    for name, value in engine.module.state_dict(keep_vars=True).items():
        if not isinstance(value, torch.nn.Parameter):  # a buffer: never partitioned
            if rank == 0:
                state[name] = value.detach().cpu()
            continue
        if id(value) not in gathered:
            full = safe_get_full_fp32_param(value)
            if full is None:  # not optimized (frozen) or no master copy (ZeRO 0, fp32)
                full = _gather_module_param(value, zero_stage)
            gathered[id(value)] = full.detach().cpu() if rank == 0 else None  # only rank 0 keeps it
        if rank == 0:
            state[name] = gathered[id(value)]
    return state if rank == 0 else None


def _gather_module_param(param: torch.nn.Parameter, zero_stage: int) -> torch.Tensor:
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone()
    return param.detach()


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors to `dtype`; a tensor under two names (tied) stays one tensor."""
    done: dict[int, torch.Tensor] = {}
    for tensor in state.values():
        if id(tensor) not in done:
            done[id(tensor)] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return {name: done[id(tensor)] for name, tensor in state.items()}


def save_checkpoint(
    *,
    engine,
    zero_stage: int,
    tokenizer,
    destination: Path,
    dtype: torch.dtype,
) -> None:
    """Save on rank 0; every rank must call (the ZeRO-3 gather is collective)."""
    state = full_state_dict(engine, zero_stage)
    if dist.get_rank() == 0:
        state = _cast(state, dtype)
        model = engine.module
        config = copy.deepcopy(model.config)
        config.dtype = dtype  # save_pretrained writes the module's (training) dtype instead
        config.use_cache = True  # turned off for training; generation wants it
        # the class trained, e.g. a score head on a causal-LM base (save_pretrained sets it on the
        # module's config, not on this copy, which still names the base's class)
        config.architectures = [type(model).__name__]
        with atomic_path(destination) as tmp:
            model.save_pretrained(tmp, state_dict=state)
            config.save_pretrained(tmp)  # replaces the config.json just written
            tokenizer.save_pretrained(tmp)
            for file in tmp.iterdir():
                # transformers writes model.safetensors 0600; the next round's generator
                # (another container, maybe another uid) must be able to read it.
                file.chmod(0o644)
        log.info("saved checkpoint %s", destination)
    dist.barrier()
