"""The DPO objective as pure tensor functions (no model, no DeepSpeed), so it can be
checked against hand-computed numbers.

Shapes: B = pairs in a batch, N = sequences (2B when chosen and rejected are stacked),
L = tokens per sequence, V = vocabulary size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO loss per pair, with conservative label smoothing (cDPO).

    Every input is [B]: the summed log-probability of each pair's chosen or rejected
    response under the policy or the reference. With z = (pi_c - pi_r) - (ref_c - ref_r):

        loss = -(1 - eps) * log sigmoid(beta * z) - eps * log sigmoid(-beta * z)

    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]); the implicit rewards
    beta * (pi - ref) are detached: they are reported, not trained on.
    """
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    losses = (
        -F.logsigmoid(beta * logits) * (1.0 - label_smoothing)
        - F.logsigmoid(-beta * logits) * label_smoothing
    )
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


# training.loss.type -> its loss, with dpo_loss's signature. The names are those of
# iterdpo.spec.LOSS_KINDS (a unit test checks that the two agree); a new type is a function
# above and one entry here.
LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
LOSSES: dict[str, LossFn] = {"sigmoid": dpo_loss}


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the masked (response) tokens of each sequence.

    logits [N, L, V] from the model on input_ids [N, L]; labels [N, L] = input_ids;
    mask [N, L] is 1 where labels[:, j] is a response token (prompt and padding are 0).
    Position j-1 predicts token j, so logits are shifted left against labels and mask.
    Computed in float32 whatever the model's dtype. Returns [N].
    """
    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    mask = mask[:, 1:].to(logits.dtype)
    # log_softmax(x)[y] = x[y] - logsumexp(x): avoids materialising a second [N, L, V] tensor.
    picked = torch.gather(logits, 2, labels.unsqueeze(-1)).squeeze(-1)
    token_logps = picked - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(dim=-1)
