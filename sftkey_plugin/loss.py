"""Loss pieces on per-token tensors, independent of any trainer.

Conventions: ``key_mask`` is aligned with ``input_ids``/``labels`` (shape ``(B, S)``); per-token losses are aligned
with the *shifted* labels ``labels[:, 1:]`` (shape ``(B, S-1)``), as causal-LM losses are.

Normalisation: every mode divides by the number of loss tokens of the whole optimizer step (transformers'
``num_items_in_batch``: all gradient-accumulation micro-batches, all processes). In stage 2 and ``key_only`` the
loss tokens *are* the key tokens, so the loss is the mean NLL of the key tokens. In ``weighted`` mode the loss is
``sum(w_t * nll_t) / n_loss_tokens`` by default (``sftkey_normalize="tokens"``): 1.0/1.0 is plain SFT bit for bit
and a larger key weight gives the key tokens a larger share of the gradient. ``sftkey_normalize="weights"`` divides
by ``sum(w_t)`` instead (a weighted mean, as LLaMA-Factory's weighted loss), so scaling both weights changes nothing.
"""

from __future__ import annotations

import torch

from .masking import IGNORE_INDEX
from .schedule import PhasePoint

METRIC_PREFIX = "sftkey/"


def mask_zero_weight_labels(
    labels: torch.Tensor, key_mask: torch.Tensor, key_weight: float, other_weight: float
) -> torch.Tensor:
    """Labels with every token of weight 0 set to ``-100`` (other weight 0: the stage-2 / ``key_only`` objective), so
    those tokens leave the loss and its token count, and fused or chunked loss paths skip them."""
    if key_weight != 0 and other_weight != 0:
        return labels
    is_key = key_mask.to(labels.device) != 0
    return labels.masked_fill(~is_key if other_weight == 0 else is_key, IGNORE_INDEX)


def data_token_weights(
    key_mask: torch.Tensor, key_weight: float, other_weight: float, data_weight: torch.Tensor, prompt: torch.Tensor
) -> torch.Tensor:
    """Each token's weight with data weights: its data weight times the step's key or other weight (1 for a prompt
    token, which the prompt weight alone weighs)."""
    mode = torch.where(key_mask != 0, key_weight, other_weight).to(data_weight.dtype)
    return torch.where(prompt != 0, torch.ones_like(mode), mode) * data_weight


def shifted(key_mask: torch.Tensor) -> torch.Tensor:
    """The key mask aligned with next-token losses (``labels[:, 1:]``)."""
    return key_mask[..., 1:]


def excess_weights(shifted_key_mask: torch.Tensor, key_weight: float, other_weight: float) -> torch.Tensor:
    """``w - 1`` for each next-token loss: what ``weighted`` mode adds to the plain loss of each token."""
    mask = shifted_key_mask.float()
    return (other_weight - 1.0) + (key_weight - other_weight) * mask


def weight_sum(
    shifted_key_mask: torch.Tensor, trained: torch.Tensor, key_weight: float, other_weight: float
) -> torch.Tensor:
    """``sum(w)`` over the trained tokens: the ``sftkey_normalize="weights"`` denominator."""
    return ((1.0 + excess_weights(shifted_key_mask, key_weight, other_weight)) * trained.float()).sum()


def _chunked_nll(flat_logits: torch.Tensor, flat_labels: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """Cross-entropy of each row, in float32 chunks of at most ``chunk_elements`` logits (128 MiB by default), so a
    150k vocabulary is never upcast whole."""
    chunk_size = max(1, chunk_elements // flat_logits.size(-1))
    pieces = [
        torch.nn.functional.cross_entropy(
            flat_logits[i : i + chunk_size].float(),
            flat_labels[i : i + chunk_size],
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
        for i in range(0, flat_labels.numel(), chunk_size)
    ]
    return torch.cat(pieces) if pieces else flat_logits.new_zeros(0, dtype=torch.float32)


def per_token_nll(logits: torch.Tensor, labels: torch.Tensor, chunk_elements: int = 1 << 25) -> torch.Tensor:
    """Next-token NLL of each label (``labels[:, 1:]``), zero where ignored. The labels are shifted, not the logits:
    slicing ``logits[:, :-1]`` would copy the whole ``(B, S, V)`` tensor, which cost more than the NLL itself."""
    next_labels = torch.nn.functional.pad(labels[:, 1:].to(logits.device), (0, 1), value=IGNORE_INDEX)
    nll = _chunked_nll(logits.reshape(-1, logits.size(-1)), next_labels.reshape(-1), chunk_elements)
    return nll.view(labels.size(0), -1)[:, :-1]


def _selected_rows(
    logits: torch.Tensor, labels: torch.Tensor, selected: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The logit rows predicting the labels where ``selected`` (aligned with ``labels[:, 1:]``), those labels, and
    the positions. Indexing, not reshaping ``logits[:, :-1]``, so only the selected rows are copied."""
    batch, position = selected.to(logits.device).nonzero(as_tuple=True)
    return logits[batch, position], labels.to(logits.device)[batch, position + 1], (batch, position)


def selected_token_nll(
    logits: torch.Tensor, labels: torch.Tensor, selected: torch.Tensor, chunk_elements: int = 1 << 25
) -> torch.Tensor:
    """Next-token NLL of the labels where ``selected`` (aligned with ``labels[:, 1:]``) is true, as a 1-D tensor.

    Only those rows of the logits are gathered and upcast, so a graph through it keeps ``selected.sum()`` rows of
    float32 log-probabilities, not the whole ``(B, S, V)``.
    """
    rows, targets, _ = _selected_rows(logits, labels, selected)
    return _chunked_nll(rows, targets, chunk_elements)


def is_top1_where(logits: torch.Tensor, labels: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Whether each next-token label is the model's most likely token, decided only where ``selected`` (False
    elsewhere): the metrics need it for the key tokens alone, and an argmax over every row of a large vocabulary
    cost more than the NLL."""
    rows, targets, positions = _selected_rows(logits, labels, selected)
    top1 = torch.zeros(selected.shape, dtype=torch.bool, device=logits.device)
    top1[positions] = rows.argmax(dim=-1) == targets
    return top1


def key_metric_sums(
    nll: torch.Tensor,
    is_top1: torch.Tensor | None,
    scored: torch.Tensor,
    completion: torch.Tensor,
    shifted_key_mask: torch.Tensor,
    per_row: bool = False,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sums to reduce across micro-batches and processes before dividing.

    ``scored``: tokens in this step's loss; ``completion``: tokens trained in stage 1, prompt tokens left out (both
    aligned with ``nll``); ``weights``: each token's weight in the loss (None: evaluation, which weighs nothing).
    Returns ``[key nll, key scored, key right, other nll, other scored, key tokens, completion tokens, weight sum,
    loss tokens]`` (the last two over every scored token, prompt tokens included), or with ``per_row`` one such row
    per batch row.
    """
    # products and sums only (no boolean indexing), so nothing waits for the device
    nll = nll.detach().float()
    scored = scored.to(nll.device).float()
    completion = completion.to(nll.device).float()
    key = shifted_key_mask.to(nll.device).float() * completion
    key_scored = key * scored
    other_scored = (completion - key) * scored
    right = is_top1.to(nll.device).float() * key_scored if is_top1 is not None else torch.zeros_like(key)
    weighed = weights.to(nll.device).float() * scored if weights is not None else torch.zeros_like(key)
    columns = [nll * key_scored, key_scored, right, nll * other_scored, other_scored, key, completion, weighed, scored]
    if per_row:
        return torch.stack([column.flatten(1).sum(1) for column in columns], dim=1)
    return torch.stack([column.sum() for column in columns])


def metrics_from_sums(sums: torch.Tensor, point: PhasePoint, training: bool = True) -> dict[str, float]:
    """The ``sftkey/*`` metrics; a loss is left out when no token of its kind was scored, rather than logged as 0.
    The phase and weights are those of training steps only: evaluation weighs nothing."""
    key_nll, key_scored, key_right, other_nll, other_scored, key_tokens, completion_tokens, weight, loss_tokens = (
        sums.tolist()
    )
    metrics = {f"{METRIC_PREFIX}stage": float(point.stage)}
    if training:
        metrics[f"{METRIC_PREFIX}phase"] = float(point.phase)
        metrics[f"{METRIC_PREFIX}key_weight"] = point.key_weight
        metrics[f"{METRIC_PREFIX}other_weight"] = point.other_weight
        if loss_tokens > 0:  # the mean weight of the tokens in the loss
            metrics[f"{METRIC_PREFIX}mean_weight"] = weight / loss_tokens
    if completion_tokens > 0:
        metrics[f"{METRIC_PREFIX}key_fraction"] = key_tokens / completion_tokens
    if key_scored > 0:
        metrics[f"{METRIC_PREFIX}key_loss"] = key_nll / key_scored
        metrics[f"{METRIC_PREFIX}key_token_accuracy"] = key_right / key_scored
    if other_scored > 0:
        metrics[f"{METRIC_PREFIX}reasoning_loss"] = other_nll / other_scored
    return metrics
