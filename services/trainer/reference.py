"""Reference log-probs, computed once before training and looked up by pair index.

Why precompute: the reference model is then not held in memory while the policy
trains. Why by index: TRL's precomputation under several processes once paired the
values with the wrong examples (TRL #2423, #2569), because each process kept only
the values of the batches it saw. Here each rank computes the pairs it owns
(index % world == rank), then an all-reduce gives every rank the value of every
pair index; a count check proves each pair was computed exactly once.
The result is cached (atomically) under the train folder, keyed by what it depends
on, so a restarted train stage skips the pass.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from iterdpo.atomic import atomic_path

from iterdpo_trainer.data import TokenizedPair, collate
from iterdpo_trainer.forward import batch_logps

log = logging.getLogger(__name__)


def cache_key(*, pairs_digest: str, reference: str, tokenization: dict) -> str:
    """Digest of the pairs file, the reference model and the tokenization settings."""
    blob = json.dumps({"pairs": pairs_digest, "reference": reference, "tokenization": tokenization}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_cache(path: Path, key: str, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (chosen [n], rejected [n]) if `path` holds values for exactly this key."""
    if not path.exists():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged cache is recomputed, not fatal
        log.warning("ignoring unreadable reference cache %s: %s", path, exc)
        return None
    if data.get("key") != key or data["chosen"].shape != (count,):
        return None
    return data["chosen"], data["rejected"]


def save_cache(path: Path, key: str, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    with atomic_path(path) as tmp:
        torch.save({"key": key, "chosen": chosen.cpu(), "rejected": rejected.cpu()}, tmp)


def reference_logps(
    *,
    reference: str,
    pairs: list[TokenizedPair],
    cache: Path,
    key: str,
    pad_token_id: int,
    batch_pairs: int,
    dtype: torch.dtype,
    device: torch.device,
    rank: int,
    world_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [n], rejected [n]) float32 on CPU, identical on every rank. Collective: every rank calls it."""
    n = len(pairs)
    cached = load_cache(cache, key, n)
    # Every rank must take the same branch, or the collectives below would hang.
    have = torch.tensor([1 if cached is not None else 0], device=device)
    dist.all_reduce(have, op=dist.ReduceOp.MIN)
    if have.item() == 1:
        log.info("reference log-probs: reusing %s", cache)
        return cached

    from transformers import AutoModelForCausalLM

    log.info("reference log-probs: computing %d pairs with %s", n, reference)
    model = AutoModelForCausalLM.from_pretrained(reference, dtype=dtype).to(device)
    model.eval()
    values = torch.zeros((n, 2), dtype=torch.float64, device=device)
    counts = torch.zeros((n,), dtype=torch.float64, device=device)
    owned = list(range(rank, n, world_size))
    with torch.no_grad():
        for start in range(0, len(owned), batch_pairs):
            indices = owned[start : start + batch_pairs]
            chosen, rejected = batch_logps(model, collate([pairs[i] for i in indices], pad_token_id), device)
            index = torch.tensor(indices, device=device)
            values[index, 0] = chosen.to(values.dtype)
            values[index, 1] = rejected.to(values.dtype)
            counts[index] += 1
    del model  # the reference is not held while the policy trains
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    dist.all_reduce(values)
    dist.all_reduce(counts)
    if not torch.all(counts == 1):
        raise RuntimeError("reference pass: some pair was not computed exactly once")
    chosen, rejected = values[:, 0].float().cpu(), values[:, 1].float().cpu()
    if rank == 0:
        save_cache(cache, key, chosen, rejected)
    dist.barrier()
    return chosen, rejected
