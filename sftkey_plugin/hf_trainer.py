"""The loss side of SFTKey on any ``transformers.Trainer`` subclass (TRL's ``SFTTrainer``, Axolotl's trainer).

The trainer's own loss stays in charge (TRL's fused log-prob head or chunked NLL, the model's loss, DFT, MoE aux
loss, DDP scaling); SFTKey only
- masks non-key labels for stage 2 / ``key_only`` steps, in ``get_batch_samples`` for the token count of the whole
  optimizer step and in ``compute_loss`` for the forward, so the loss is the mean NLL of the step's key tokens;
- in ``weighted`` mode adds ``sum((w - 1) * nll) / n`` to the trainer's ``sum(nll) / n`` (zero for 1.0/1.0);
- reads the per-token values of the same forward (through a forward hook, no second pass) for the
  ``sftkey/*`` metrics, logged through ``Trainer.log``.
Evaluation never masks: ``eval_loss`` stays the loss of every completion token, comparable across stages, and
``eval_sftkey/key_loss`` / ``eval_sftkey/reasoning_loss`` show each part.
"""

from __future__ import annotations

from typing import Any

import torch

from .callback import SFTKeyCallback
from .collator import SFTKEY_MASK
from .config import SFTKeyArguments
from .loss import (
    IGNORE_INDEX,
    is_top1_from_logits,
    key_metric_sums,
    mask_labels_to_key,
    metrics_from_sums,
    per_token_nll,
    shifted,
    weighted_correction,
)
from .schedule import STAGE_KEY_ONLY


def per_token_values(
    outputs: Any, labels: torch.Tensor, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(nll, is_top1)`` aligned with ``labels[:, 1:]`` from a forward's outputs, or None when the loss path keeps
    no per-token values (a chunked or fused loss that returns only the total). From full logits the NLL is
    recomputed, with a graph only when the loss needs it (``with_grad``; the metrics do not)."""
    log_probs = getattr(outputs, "log_probs", None)
    if log_probs is not None:  # TRL >= 1.10's fused LM head
        return -log_probs, getattr(outputs, "is_top1", None)
    logits = getattr(outputs, "logits", None)
    if logits is None or logits.dim() != 3 or logits.size(1) != labels.size(1):
        return None
    with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
        return per_token_nll(logits, labels), is_top1_from_logits(logits, labels)


class SFTKeyLossMixin:
    """Mix in before a ``transformers.Trainer`` subclass; call ``_sftkey_setup(arguments)`` after its ``__init__``."""

    sftkey_arguments: SFTKeyArguments
    sftkey_callback: SFTKeyCallback

    def _sftkey_setup(self, arguments: SFTKeyArguments, forward_module: torch.nn.Module) -> None:
        """Install the callback (or adopt one the user passed), the metric buffers and the output capture hook."""
        self.sftkey_arguments = arguments
        existing = [cb for cb in self.callback_handler.callbacks if isinstance(cb, SFTKeyCallback)]  # type: ignore[attr-defined]
        if existing:
            self.sftkey_callback = existing[0]
            self.sftkey_callback.arguments = arguments
        else:
            self.sftkey_callback = SFTKeyCallback(arguments)
            self.add_callback(self.sftkey_callback)  # type: ignore[attr-defined]
        self._sftkey_sums: dict[str, tuple[torch.Tensor, int]] = {}  # mode -> (metric sums, stage) since last log
        self._sftkey_outputs: Any = None
        self._sftkey_capturing = False
        forward_module.register_forward_hook(self._sftkey_capture)

    def _sftkey_capture(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._sftkey_capturing:
            self._sftkey_outputs = output

    @property
    def _sftkey_active(self) -> bool:
        """False until ``_sftkey_setup`` ran (``sftkey`` off): every override then defers to the stock trainer."""
        return getattr(self, "sftkey_callback", None) is not None

    @property
    def sftkey_stage(self) -> int:
        """The stage of the optimizer step in progress (1: every completion token; 2: key tokens only)."""
        return self.sftkey_callback.stage(self.state.global_step)  # type: ignore[attr-defined]

    def _sftkey_masks_labels(self) -> bool:
        return self.model.training and self.sftkey_stage == STAGE_KEY_ONLY  # type: ignore[attr-defined]

    def get_batch_samples(self, epoch_iterator, num_batches, device):  # type: ignore[no-untyped-def]
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)  # type: ignore[misc]
        if self._sftkey_active and num_items is not None and batches and self.sftkey_stage == STAGE_KEY_ONLY:
            # Count the step's key tokens (all micro-batches, all processes) the way the trainer counts labels.
            # Here rather than in _get_num_items_in_batch: evaluation counts through that too (and must not mask),
            # and model.training cannot tell them apart on the first step after loading or resuming.
            masked = [{**b, "labels": mask_labels_to_key(b["labels"], b[SFTKEY_MASK])} for b in batches]
            num_items = self._get_num_items_in_batch(masked, device)  # type: ignore[attr-defined]
            # A step without any key token: the model's loss divides its sum (0) by this count, so 0 / 1, not NaN
            num_items = num_items.clamp(min=1) if torch.is_tensor(num_items) else max(num_items, 1)
        return batches, num_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        if not self._sftkey_active:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
        if SFTKEY_MASK not in inputs:
            raise KeyError(f"SFTKey: the batch has no {SFTKEY_MASK!r}; the data collator did not carry it.")
        key_mask = inputs.pop(SFTKEY_MASK)
        completion_labels = inputs["labels"]
        stage = self.sftkey_stage
        if self._sftkey_masks_labels():
            inputs["labels"] = mask_labels_to_key(completion_labels, key_mask)
        self._sftkey_capturing = True
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
            outputs = self._sftkey_outputs
        finally:
            self._sftkey_capturing = False
            self._sftkey_outputs = None
        loss = result[0] if return_outputs else result
        args = self.sftkey_arguments
        weighted = args.sftkey_mode == "weighted" and self.model.training  # type: ignore[attr-defined]
        values = per_token_values(outputs, inputs["labels"], with_grad=weighted)
        if weighted:
            if values is None:
                raise RuntimeError(
                    "sftkey_mode='weighted' needs per-token losses, but this loss path returns only a total. With "
                    "trl < 1.10 set loss_type='nll'; with Axolotl turn off cut_cross_entropy / Liger fused CE."
                )
            correction = weighted_correction(
                values[0], shifted(key_mask), args.sftkey_key_weight, args.sftkey_other_weight
            )
            loss = loss + correction * self._sftkey_loss_scale(inputs["labels"], num_items_in_batch)
        self._sftkey_record(values, inputs["labels"], completion_labels, key_mask, stage)
        return (loss, result[1]) if return_outputs else loss

    def _sftkey_loss_scale(self, labels: torch.Tensor, num_items_in_batch: Any) -> Any:
        """The factor the trainer's loss applies to a summed loss: ``1 / n`` times the DDP token-average factor."""
        if num_items_in_batch is None:
            return 1.0 / max(int((labels[..., 1:] != IGNORE_INDEX).sum()), 1)
        scale = 1.0 / torch.as_tensor(num_items_in_batch).clamp(min=1)
        if self.args.average_tokens_across_devices:  # type: ignore[attr-defined]
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            scale = scale * (self.accelerator.num_processes // tp_size)  # type: ignore[attr-defined]
        return scale

    def _sftkey_record(
        self,
        values: tuple[torch.Tensor, torch.Tensor | None] | None,
        labels: torch.Tensor,
        completion_labels: torch.Tensor,
        key_mask: torch.Tensor,
        stage: int,
    ) -> None:
        """Add this micro-batch's key/reasoning sums (gathered over processes) to the buffer of its mode."""
        scored = labels[..., 1:] != IGNORE_INDEX
        completion = completion_labels[..., 1:] != IGNORE_INDEX
        if values is None:
            nll, is_top1 = torch.zeros(scored.shape, device=scored.device), None
            scored = torch.zeros_like(scored)  # nothing per-token to score: only counts are logged
        else:
            nll, is_top1 = values
        sums = key_metric_sums(nll, is_top1, scored, completion, shifted(key_mask))
        sums = self.accelerator.gather(sums[None]).sum(0)  # type: ignore[attr-defined]
        mode = "train" if self.model.training else "eval"  # type: ignore[attr-defined]
        # kept on the device until logged: a copy to the host here would wait for the GPU every micro-batch
        if mode in self._sftkey_sums:
            sums = sums + self._sftkey_sums[mode][0]
        self._sftkey_sums[mode] = (sums, stage)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        buffered = self._sftkey_sums.pop(mode, None) if self._sftkey_active else None
        if buffered is not None:
            sums, stage = buffered
            prefix = "eval_" if mode == "eval" else ""
            # in place, as Trainer.evaluate returns the dict it logged
            logs.update({prefix + k: v for k, v in metrics_from_sums(sums.cpu(), stage).items()})
        super().log(logs, *args, **kwargs)  # type: ignore[misc]
