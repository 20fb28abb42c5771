"""One forward pass over a stacked batch -> summed response log-probs; shared by the
reference pass and the training loop, so both score exactly the same tokens."""

from __future__ import annotations

import torch

from iterdpo_trainer.loss import sequence_logps


def batch_logps(model, batch: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [B], rejected [B]) summed log-probs for a batch made by data.collate."""
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    response_mask = batch["response_mask"].to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logps = sequence_logps(logits, input_ids, response_mask)
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]
