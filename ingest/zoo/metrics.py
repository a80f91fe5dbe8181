"""Metric functions on logits, shared by the zoo's tasks.

All take logits and token-id sets as tensors and return one value per example, so a
task's metric is a few lines and every function can be checked on hand-built logits.
Id sets are right-padded with ``-1``.

- probability difference (Hanna et al. 2023, greater-than): ``sum_{y in answers} p(y) -
  sum_{y in wrong} p(y)``, with ``p`` the softmax over the whole vocabulary;
- logit difference (Wang et al. 2023, IOI): mean logit of the answers minus mean logit of
  the wrong answers;
- accuracy: the arg-max token is one of the answers;
- per-token next-token loss (Olsson et al. 2022, induction): cross-entropy of each
  token given its prefix.
"""

import torch
import torch.nn.functional as F


def gather_last(logits: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """Logits at each row's ``last_index``: ``[B, T, V]`` -> ``[B, V]``."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, last_index.to(logits.device)]


def _masked_gather(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``values [B, V]`` at ``ids [B, K]`` (``-1`` = padding): values and mask, ``[B, K]``."""
    mask = ids >= 0
    gathered = values.gather(1, ids.clamp(min=0).to(values.device))
    return gathered, mask.to(values.device)


def probability_mass(last_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Total probability of the tokens in ``ids``: ``[B, V]``, ``[B, K]`` -> ``[B]``."""
    probs = last_logits.float().softmax(dim=-1)
    gathered, mask = _masked_gather(probs, ids)
    return (gathered * mask).sum(dim=1)


def probability_difference(
    last_logits: torch.Tensor, answer_ids: torch.Tensor, wrong_ids: torch.Tensor
) -> torch.Tensor:
    """``P(answers) - P(wrong)`` per example: ``[B, V]``, ``[B, A]``, ``[B, W]`` -> ``[B]``."""
    return probability_mass(last_logits, answer_ids) - probability_mass(last_logits, wrong_ids)


def mean_logit(last_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean logit over the tokens in ``ids``: ``[B, V]``, ``[B, K]`` -> ``[B]``."""
    gathered, mask = _masked_gather(last_logits.float(), ids)
    return (gathered * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def logit_difference(
    last_logits: torch.Tensor, answer_ids: torch.Tensor, wrong_ids: torch.Tensor
) -> torch.Tensor:
    """Mean answer logit minus mean wrong logit: ``[B, V]``, ``[B, A]``, ``[B, W]`` -> ``[B]``."""
    return mean_logit(last_logits, answer_ids) - mean_logit(last_logits, wrong_ids)


def top1_accuracy(last_logits: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """1.0 where the arg-max token is one of the answers: ``[B, V]``, ``[B, A]`` -> ``[B]``."""
    top = last_logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    hit = (answer_ids.to(top.device) == top) & (answer_ids.to(top.device) >= 0)
    return hit.any(dim=1).float()


def next_token_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Loss of token ``t + 1`` given its prefix: ``[B, T, V]``, ``[B, T]`` -> ``[B, T-1]``."""
    logprobs = logits[:, :-1].float().log_softmax(dim=-1)
    targets = input_ids[:, 1:].to(logits.device)
    return -logprobs.gather(2, targets.unsqueeze(-1)).squeeze(-1)


def answer_cross_entropy(last_logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of one target token per row: ``[B, V]``, ``[B]`` -> ``[B]``."""
    return F.cross_entropy(last_logits.float(), target_ids.to(last_logits.device), reduction="none")
