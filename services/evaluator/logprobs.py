"""Each response's summed log-probability under a causal LM, read by transformers.

The KL estimate of the Evaluate stage compares the policy with the initial policy on the
policy's own responses; both sides are read here, by the same code and precision, so that
a policy equal to its reference reads exactly 0 (vLLM's sampling log-probs would differ
from transformers' by kernel noise).
"""

from __future__ import annotations

from collections.abc import Sequence

BATCH_TOKENS = 8192  # padded tokens per forward pass


def sequence_logps(model_path: str, sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[float]:
    """sum_t log p(response_t | prompt, response_<t) for each (prompt ids, response ids)."""
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if cuda else torch.float32)
    model = model.to("cuda" if cuda else "cpu").eval()
    out: list[float | None] = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: -(len(sequences[i][0]) + len(sequences[i][1])))
    start = 0
    while start < len(order):
        width = len(sequences[order[start]][0]) + len(sequences[order[start]][1])  # the longest left: sorted
        batch = order[start : start + max(1, BATCH_TOKENS // max(1, width))]
        start += len(batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            seq = [*sequences[i][0], *sequences[i][1]]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        for row, i in enumerate(batch):
            prompt, response = sequences[i]
            if not response:
                out[i] = 0.0
                continue
            n = len(prompt)
            scores = logits[row, n - 1 : n - 1 + len(response)].float().log_softmax(-1)
            picked = scores.gather(-1, torch.tensor(list(response), device=scores.device)[:, None])
            out[i] = float(picked.sum())
    del model
    return out  # type: ignore[return-value]
