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

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from transformers import TrainerState

from .callback import SFTKeyCallback
from .collator import SFTKEY_MASK
from .config import SFTKeyArguments
from .loss import (
    IGNORE_INDEX,
    data_token_weights,
    excess_weights,
    is_top1_where,
    key_metric_sums,
    mask_zero_weight_labels,
    metrics_from_sums,
    per_token_nll,
    selected_token_nll,
    shifted,
    weight_sum,
)
from .schedule import PhasePoint, weighs
from .weights import SFTKEY_PROMPT, SFTKEY_WEIGHT

T = TypeVar("T")


def main_process_first(prepare: Callable[[], T]) -> T:
    """``prepare()`` on the main process first, then on the other main process of each node, then on the rest (which
    read the cached results of those before them), as TRL prepares data. A failure on any process stops every
    process, with its message, as soon as its turn is over: the later ones do not prepare, and none waits at a
    barrier for the launcher's timeout.

    Each turn ends with one exchange of failures between all processes. Inside ``prepare``, accelerate's own
    ``main_process_first`` blocks (TRL opens them within ours) run as plain blocks: their barriers, paired across
    processes by count, would be skipped by a process that raises inside one (``contextmanager`` does not run the
    closing barrier on an exception) and then pair with a different collective elsewhere, which hangs both
    processes. Ours already lets the main process go first, so they would order nothing more."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    if state.num_processes == 1:
        return prepare()
    turn = 0 if state.is_main_process else 1 if state.is_local_main_process else 2
    result: T
    for current in range(3):
        failure = None
        if current == turn:
            try:
                with _nested_main_first_inline():
                    result = prepare()
            except Exception as error:  # raised once every process knows of it
                failure = error
        message = None if failure is None else f"{type(failure).__name__}: {failure}"
        reports = gather_object([(state.process_index, message)])
        failed = next(((index, text) for index, text in reports if text is not None), None)
        if failure is not None:
            raise failure
        if failed is not None:
            raise ValueError(f"process {failed[0]} failed preparing the data: {failed[1]}")
    return result  # set in this process's turn (which raised otherwise)


@contextmanager
def _nested_main_first_inline() -> Iterator[None]:
    """accelerate's ``main_process_first`` and ``local_main_process_first`` as plain blocks while this one is open."""
    from accelerate import PartialState

    saved = PartialState.main_process_first, PartialState.local_main_process_first
    PartialState.main_process_first = PartialState.local_main_process_first = _plain_block  # type: ignore[method-assign]
    try:
        yield
    finally:
        PartialState.main_process_first, PartialState.local_main_process_first = saved  # type: ignore[method-assign]


@contextmanager
def _plain_block(_state: Any) -> Iterator[None]:
    """A block that every process enters at once (a ``main_process_first`` without its barriers)."""
    yield


def per_token_values(
    outputs: Any, labels: torch.Tensor, key_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(nll, is_top1)`` aligned with ``labels[:, 1:]`` from a forward's outputs, or None when the loss path keeps
    no per-token values (a chunked or fused loss that returns only the total). From full logits the NLL is
    recomputed without a graph, and ``is_top1`` only for the trained key tokens: they only feed the metrics."""
    log_probs = getattr(outputs, "log_probs", None)
    if log_probs is not None:  # TRL >= 1.15's fused LM head
        return -log_probs.detach(), getattr(outputs, "is_top1", None)
    logits = getattr(outputs, "logits", None)
    if logits is None or logits.dim() != 3 or logits.size(1) != labels.size(1):
        return None
    with torch.no_grad():
        trained_key = (shifted(key_mask).to(labels.device) != 0) & (labels[..., 1:] != IGNORE_INDEX)
        return per_token_nll(logits, labels), is_top1_where(logits, labels, trained_key)


class SFTKeyLossMixin:
    """Mix in before a ``transformers.Trainer`` subclass; call ``_sftkey_setup(arguments)`` after its ``__init__``."""

    if TYPE_CHECKING:  # what the mixin uses of the Trainer it is mixed into (declared for the type checker only)
        args: Any
        state: TrainerState
        model: Any
        accelerator: Any
        callback_handler: Any
        compute_loss_func: Any
        model_accepts_loss_kwargs: bool
        data_collator: Any
        processing_class: Any
        _signature_columns: Any

        def add_callback(self, callback: Any) -> None: ...

    sftkey_arguments: SFTKeyArguments
    sftkey_callback: SFTKeyCallback

    def _sftkey_setup(self, arguments: SFTKeyArguments, forward_module: torch.nn.Module) -> None:
        """Install the callback (or adopt one the user passed), the metric buffers and the output capture hook."""
        self.sftkey_arguments = arguments
        existing = [cb for cb in self.callback_handler.callbacks if isinstance(cb, SFTKeyCallback)]
        if existing:
            self.sftkey_callback = existing[0]
            self.sftkey_callback.arguments = arguments
        else:
            self.sftkey_callback = SFTKeyCallback(arguments)
            self.add_callback(self.sftkey_callback)
        self.sftkey_callback.bound = True
        # "train" / "eval" -> (this process's metric sums since they were last reduced, phase); then the reduced
        # metrics, reduced where every process is (a training step that logs, the end of an evaluation loop), until
        # the log that reports them
        self._sftkey_sums: dict[str, tuple[torch.Tensor, PhasePoint]] = {}
        self._sftkey_ready: dict[str, dict[str, float]] = {}
        self._sftkey_eval_prefix: str | None = None  # the metric_key_prefix of the evaluate() running
        self._sftkey_logging_step = False
        self._sftkey_outputs: Any = None
        self._sftkey_capturing = False
        forward_module.register_forward_hook(self._sftkey_capture)

    def set_initial_training_values(self, *args: Any, **kwargs: Any) -> Any:
        values = super().set_initial_training_values(*args, **kwargs)  # type: ignore[misc]
        # transformers 5.16-5.25 return (epochs, updates per epoch, examples, samples, total batch size,
        # steps_in_epoch, max_steps): unpacked, so another shape fails here instead of reading a wrong value
        _, _, _, _, _, steps_in_epoch, _ = values
        if self._sftkey_active:  # the batches per epoch the schedule's warnings count epochs with
            self.sftkey_callback.batches_per_epoch = steps_in_epoch
        return values

    def _sftkey_capture(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._sftkey_capturing:
            self._sftkey_outputs = output

    @property
    def _sftkey_active(self) -> bool:
        """False until ``_sftkey_setup`` ran (``sftkey`` off): every override then defers to the stock trainer."""
        return getattr(self, "sftkey_callback", None) is not None

    @property
    def sftkey_point(self) -> PhasePoint:
        """The phase and weights of the optimizer step in progress."""
        return self.sftkey_callback.point(self.state)

    @property
    def sftkey_stage(self) -> int:
        """The stage of the optimizer step in progress (1: every completion token; 2: key tokens only)."""
        return self.sftkey_point.stage

    def get_batch_samples(self, epoch_iterator, num_batches, device):  # type: ignore[no-untyped-def]
        # Only the training loop fetches an optimizer step's micro-batches here; evaluation counts its batches
        # through _get_num_items_in_batch directly, and must count (and score) every token.
        self._sftkey_counting_step = self._sftkey_active
        try:
            return super().get_batch_samples(epoch_iterator, num_batches, device)  # type: ignore[misc]
        finally:
            self._sftkey_counting_step = False

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Any:
        """The loss denominator of an optimizer step, counted once over its micro-batches and processes as the
        trainer counts labels: the weight sum with ``sftkey_normalize="weights"``, else the tokens of weight > 0 (the
        key tokens in stage 2; at least 1 when a weight is 0, so a step without any such token has loss 0, not 0/0)."""
        count = super()._get_num_items_in_batch  # type: ignore[misc]
        if not getattr(self, "_sftkey_counting_step", False) or not batch_samples:
            # evaluation: the completion tokens, as compute_loss scores them (not the prompt the prompt weight trains)
            return count([_without_prompt(b) for b in batch_samples], device)
        point = self.sftkey_point
        data_weights = SFTKEY_WEIGHT in batch_samples[0]
        weights = [_token_weights(b, point) for b in batch_samples]
        trained = [
            {**b, "labels": self._sftkey_loss_labels(b["labels"], b, point, w)} for b, w in zip(batch_samples, weights)
        ]
        if self.sftkey_arguments.sftkey_normalize == "weights" and (weighs(*point.weights) or data_weights):
            # transformers' own condition for counting at all: otherwise the loss is a mean per micro-batch
            if not (self.model_accepts_loss_kwargs or self.compute_loss_func is not None):
                raise ValueError(
                    "sftkey_normalize='weights' needs a loss normalised per optimizer step (num_items_in_batch), "
                    "which this model's loss does not take: use sftkey_normalize='tokens'."
                )
            return self._sftkey_weight_sum(trained, device, point, weights)
        num_items = count(trained, device)
        if point.key_weight and point.other_weight and not data_weights:
            return num_items
        return num_items.clamp(min=1) if torch.is_tensor(num_items) else num_items

    def _sftkey_weight_sum(
        self, batch_samples: list, device: torch.device, point: PhasePoint, token_weights: list[torch.Tensor | None]
    ) -> torch.Tensor:
        """Sum of the token weights of an optimizer step, at least 1 (all micro-batches; all processes when the
        trainer averages tokens across them, as it does the count). ``token_weights``: each micro-batch's
        ``_token_weights``."""
        sums = []
        for b, weights in zip(batch_samples, token_weights):
            trained = b["labels"][..., 1:] != IGNORE_INDEX
            if weights is None:
                sums.append(weight_sum(shifted(b[SFTKEY_MASK]), trained, *point.weights).to(device))
            else:
                sums.append((shifted(weights).to(trained.device) * trained).sum().to(device))
        total = torch.stack(sums).sum()
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total[None]).sum()
        # as TRL clamps its denominator (a step whose weights sum below 1 is not scaled up), then as transformers
        # divides its token count by the tensor/context/sequence-parallel processes that share one batch
        shared = 1
        for getter in ("get_tp_size", "get_cp_size", "get_sp_size"):
            shared *= getattr(self, getter)() if hasattr(self, getter) else 1
        return total.clamp(min=1.0) / shared

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        if not self._sftkey_active:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
        if SFTKEY_MASK not in inputs:
            raise KeyError(f"SFTKey: the batch has no {SFTKEY_MASK!r}; the data collator did not carry it.")
        columns = {name: inputs.pop(name) for name in (SFTKEY_MASK, SFTKEY_WEIGHT, SFTKEY_PROMPT) if name in inputs}
        key_mask = columns[SFTKEY_MASK]
        point, training = self.sftkey_point, self.model.training  # evaluation scores every completion token
        weights = _token_weights(columns, point)
        # the prompt tokens the prompt weight trains are no completion tokens
        completion_labels = _without_prompt({**columns, "labels": inputs["labels"]})["labels"]
        if training:
            inputs["labels"] = self._sftkey_loss_labels(inputs["labels"], columns, point, weights)
        else:
            inputs["labels"] = completion_labels
        labels = inputs["labels"]  # the trainer pops it from inputs when a compute_loss_func (Axolotl's use_dft) is set
        self._sftkey_capturing = True
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
            outputs = self._sftkey_outputs
        finally:
            self._sftkey_capturing = False
            self._sftkey_outputs = None
        loss = result[0] if return_outputs else result
        if training and (weighs(*point.weights) or weights is not None):
            correction = self._sftkey_correction(outputs, labels, key_mask, point, weights)
            loss = loss + correction * self._sftkey_loss_scale(labels, num_items_in_batch)
        if not training:
            metric_weights = None
        elif weights is None:
            metric_weights = torch.where(shifted(key_mask) != 0, point.key_weight, point.other_weight)
        else:
            metric_weights = shifted(weights)
        values = per_token_values(outputs, labels, key_mask)
        self._sftkey_record(values, labels, completion_labels, key_mask, point, metric_weights)
        return (loss, result[1]) if return_outputs else loss

    def _sftkey_loss_labels(
        self, labels: torch.Tensor, columns: dict[str, Any], point: PhasePoint, weights: torch.Tensor | None
    ) -> torch.Tensor:
        """The labels of a training micro-batch with every token of weight 0 set to ``-100``, so that it leaves the
        loss and the step's token count. ``weights``: the micro-batch's ``_token_weights``."""
        if weights is None:
            return mask_zero_weight_labels(labels, columns[SFTKEY_MASK], *point.weights)
        return labels.masked_fill(weights.to(labels.device) == 0, IGNORE_INDEX)

    def _sftkey_correction(
        self,
        outputs: Any,
        labels: torch.Tensor,
        key_mask: torch.Tensor,
        point: PhasePoint,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``sum((w - 1) * loss_t)`` over this micro-batch's trained tokens, ``loss_t`` the trainer's own per-token
        loss (the NLL, or DFT's ``p * NLL`` where ``_sftkey_loss_is_dft``): added to its ``sum(loss_t)`` it gives the
        weighted sum. From full logits only the tokens whose weight is not 1 are recomputed (with a graph).
        ``weights``: each token's weight with data weights (None: the step's key and other weights)."""
        excess = excess_weights(shifted(key_mask), *point.weights) if weights is None else shifted(weights) - 1.0
        log_probs = getattr(outputs, "log_probs", None)
        logits = getattr(outputs, "logits", None)
        if log_probs is not None:  # TRL >= 1.15's fused LM head: zero where the label is ignored
            nll, excess = -log_probs, excess.to(log_probs.device)
        elif logits is not None and logits.dim() == 3 and logits.size(1) == labels.size(1):
            selected = (excess.to(labels.device) != 0) & (labels[..., 1:] != IGNORE_INDEX)
            nll = selected_token_nll(logits, labels, selected)
            excess = excess.to(nll.device)[selected.to(nll.device)]
        else:
            raise RuntimeError(
                "Token weights other than 0 and 1 need per-token losses, but this loss path returns only a total. With "
                "trl < 1.15 set loss_type='nll'; with Axolotl turn off cut_cross_entropy / Liger fused CE."
            )
        if self._sftkey_loss_is_dft():
            nll = nll * torch.exp(-nll).detach()
        return (excess * nll).sum()

    def _sftkey_loss_is_dft(self) -> bool:
        """Whether the trainer's per-token loss is DFT's ``p * NLL`` (TRL's ``loss_type="dft"``)."""
        return getattr(self.args, "loss_type", None) == "dft"

    def _sftkey_loss_scale(self, labels: torch.Tensor, num_items_in_batch: Any) -> Any:
        """The factor the trainer's loss applies to a summed loss: ``1 / n`` times the DDP token-average factor."""
        if num_items_in_batch is None:
            return 1.0 / max(int((labels[..., 1:] != IGNORE_INDEX).sum()), 1)
        scale = 1.0 / torch.as_tensor(num_items_in_batch).clamp(min=1)
        if self.args.average_tokens_across_devices:
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            scale = scale * (self.accelerator.num_processes // tp_size)
        return scale

    def _sftkey_record(
        self,
        values: tuple[torch.Tensor, torch.Tensor | None] | None,
        labels: torch.Tensor,
        completion_labels: torch.Tensor,
        key_mask: torch.Tensor,
        point: PhasePoint,
        weights: torch.Tensor | None = None,
    ) -> None:
        """Add this micro-batch's key/reasoning sums to this process's buffer of its mode (reduced when logged);
        ``weights``: each next-token loss's weight (training only)."""
        scored = labels[..., 1:] != IGNORE_INDEX
        completion = completion_labels[..., 1:] != IGNORE_INDEX
        if values is None:
            nll, is_top1 = torch.zeros(scored.shape, device=scored.device), None
            scored = torch.zeros_like(scored)  # nothing per-token to score: only counts are logged
        else:
            nll, is_top1 = values
        mode = "train" if self.model.training else "eval"
        if mode == "eval" and not self._sftkey_eval_packed():
            # every process evaluates each batch: gathered per row, so that the rows accelerate repeats to even out
            # the last batch are left out, as transformers leaves them out of eval_loss
            rows = key_metric_sums(nll, is_top1, scored, completion, shifted(key_mask), per_row=True)
            sums = self.accelerator.gather_for_metrics(rows).sum(0)
        else:
            sums = key_metric_sums(nll, is_top1, scored, completion, shifted(key_mask), weights=weights)
        # kept on the device until reduced: a copy to the host here would wait for the GPU every micro-batch
        if mode in self._sftkey_sums:
            sums = sums + self._sftkey_sums[mode][0]
        self._sftkey_sums[mode] = (sums, point)

    def _sftkey_reduce(self, mode: str, reduced: bool) -> None:
        """Turn this mode's buffered sums into metrics (summed over processes unless ``reduced`` already), held for
        the next log. Every process calls it at the same point: it may be a collective."""
        buffered = self._sftkey_sums.pop(mode, None)
        if buffered is None:
            return
        sums, point = buffered
        if not reduced:
            sums = self.accelerator.gather(sums[None]).sum(0)
        self._sftkey_ready[mode] = metrics_from_sums(sums.cpu(), point, mode == "train")

    def _maybe_log_save_evaluate(self, *args: Any, **kwargs: Any) -> Any:
        # where every process is after an optimizer step, and knows whether the step logs: reduce there, so that the
        # log itself holds no collective (a log() some processes skip, from a user's callback, cannot hang)
        logging = self.control.should_log and self.state.global_step > self._globalstep_last_logged  # type: ignore[attr-defined]
        if not (self._sftkey_active and logging):  # Trainer's own condition for this step's log
            return super()._maybe_log_save_evaluate(*args, **kwargs)  # type: ignore[misc]
        self._sftkey_reduce("train", reduced=False)
        self._sftkey_logging_step = True  # the training log is the one this step writes, not a user's
        try:
            return super()._maybe_log_save_evaluate(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._sftkey_logging_step = False
            self._sftkey_ready.pop("train", None)

    def _sftkey_eval_packed(self) -> bool:
        """Whether evaluation rows hold several examples (TRL's packing or padding-free, Axolotl's sample packing): then
        they cannot be told apart from the examples accelerate repeats to even out the last batch."""
        args = self.args
        packing = getattr(args, "eval_packing", None)
        packing = getattr(args, "packing", False) if packing is None else packing
        sample_packing = getattr(args, "eval_sample_packing", None)
        sample_packing = getattr(args, "sample_packing", False) if sample_packing is None else sample_packing
        return bool(packing or sample_packing or getattr(args, "padding_free", False))

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        if not self._sftkey_active:
            return super().evaluation_loop(*args, **kwargs)  # type: ignore[misc]
        self._sftkey_sums.pop("eval", None)  # what an interrupted loop left
        output = super().evaluation_loop(*args, **kwargs)  # type: ignore[misc]
        # unpacked rows were gathered batch by batch already (_sftkey_record); packed ones are summed here
        self._sftkey_reduce("eval", reduced=not self._sftkey_eval_packed())
        return output

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        # the metrics of this evaluation go to this log, under its own prefix (not to a training log, whatever the
        # prefix, nor to a later evaluation)
        if not self._sftkey_active:
            return super().evaluate(*args, **kwargs)  # type: ignore[misc]
        self._sftkey_eval_prefix = _metric_key_prefix(args, kwargs, "eval")
        try:
            return super().evaluate(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._sftkey_eval_prefix = None
            self._sftkey_ready.pop("eval", None)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        output = super().predict(*args, **kwargs)  # type: ignore[misc]
        metrics = self._sftkey_ready.pop("eval", None) if self._sftkey_active else None
        if metrics is not None:  # predict() logs nothing: its metrics come back with its output, under its prefix
            prefix = _metric_key_prefix(args, kwargs, "test")
            output.metrics.update({f"{prefix}_{k}": v for k, v in metrics.items()})
        return output

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if not self._sftkey_active:
            return super().log(logs, *args, **kwargs)  # type: ignore[misc]
        prefix = self._sftkey_eval_prefix
        if prefix is not None:
            metrics = self._sftkey_ready.pop("eval", None)
        else:  # training metrics go to the training log of a logging step only
            metrics = self._sftkey_ready.pop("train", None) if self._sftkey_logging_step else None
        if metrics is not None:
            # in place, as Trainer.evaluate returns the dict it logged
            logs.update({(f"{prefix}_" if prefix else "") + k: v for k, v in metrics.items()})
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


def _without_prompt(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with the labels of its prompt tokens (``sftkey_prompt``) set to ``-100``; itself without them."""
    if SFTKEY_PROMPT not in batch:
        return batch
    labels = batch["labels"]
    return {**batch, "labels": labels.masked_fill(batch[SFTKEY_PROMPT].to(labels.device) != 0, IGNORE_INDEX)}


def _token_weights(columns: dict[str, Any], point: PhasePoint) -> torch.Tensor | None:
    """Each token's weight in this step's loss from a batch's data-weight columns (``data_token_weights``); None
    without them (the step's key and other weights alone)."""
    if SFTKEY_WEIGHT not in columns:
        return None
    data_weight = columns[SFTKEY_WEIGHT]
    key_mask, prompt = (columns[name].to(data_weight.device) for name in (SFTKEY_MASK, SFTKEY_PROMPT))
    return data_token_weights(key_mask, *point.weights, data_weight, prompt)


def _metric_key_prefix(args: tuple[Any, ...], kwargs: dict[str, Any], default: str) -> str:
    """The ``metric_key_prefix`` of an ``evaluate(dataset, ignore_keys, metric_key_prefix)`` or ``predict`` call."""
    return str(kwargs.get("metric_key_prefix", args[2] if len(args) > 2 else default))
