"""Training runs shared by ``test_reliability.py`` and its subprocesses (a 2-process launch, a run that gets killed).

``torchrun --nproc_per_node 2 tests/multiprocess_worker.py modes TINY_DIR OUT_DIR``: every SFTKey mode on 2 CPU
processes (gloo), saved to ``OUT_DIR/<mode>.pt``.
``python tests/multiprocess_worker.py interrupt TINY_DIR OUT_DIR READY_FILE [RUN]``: a two-stage run (``RUN`` of
``INTERRUPT_RUNS``, default ``two_stage``) that stalls right after writing its stage-2 checkpoint, so the test can kill
it with a real signal.
``torchrun ... rank0_log TINY_DIR OUT_DIR``: a run whose user callback logs on process 0 only.
``torchrun ... refuse TINY_DIR OUT_DIR``: a run refused while the main process prepares the data first.
``torchrun ... bad_mask TINY_DIR OUT_DIR``: data TRL's own preparation fails on, inside its nested main_process_first.
``record_micro_batches`` and ``training_record`` also serve the Axolotl runs (``axolotl_recorder.py``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import process_exit
import torch
from test_trl import PER_TOKEN, trainer_for
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from sftkey_plugin.examples import arithmetic_records

GLOBAL_BATCH = 4
STEPS = 4
MODES: dict[str, dict[str, Any]] = {
    # two_stage crosses the switch: steps 1-2 every completion token, steps 3-4 key tokens only
    "two_stage": {"sftkey_mode": "two_stage", "sftkey_stage2_steps": 2},
    "key_only": {"sftkey_mode": "key_only"},
    "weighted": {"sftkey_mode": "weighted", "sftkey_key_weight": 3.0, "sftkey_other_weight": 0.5, **PER_TOKEN},
    "weighted_by_weights": {
        "sftkey_mode": "weighted",
        "sftkey_key_weight": 3.0,
        "sftkey_other_weight": 0.5,
        "sftkey_normalize": "weights",
        **PER_TOKEN,
    },
}
# weights from the data (tests/test_data_weights.py) on the records of ``with_data_weights``
DATA_WEIGHTS: dict[str, Any] = {"sftkey_prompt_weight": 0.1, "sftkey_example_weight_field": "score"}
# the runs of the 2-process launch: every mode, and weighted with weights from the data
RUNS: dict[str, dict[str, Any]] = {**MODES, "weighted_data": {**MODES["weighted"], **DATA_WEIGHTS}}
# With 2 processes and 2 rows each, step k gives rows 4k, 4k+1 to process 0 and rows 4k+2, 4k+3 to process 1
# (sequential sampler, accelerate's batch sharding). These rows have no key span: process 1 has no key token in
# steps 1 and 3, and step 4 has none on either process.
KEYLESS_ROWS = frozenset({2, 3, 10, 11, 12, 13, 14, 15})

INTERRUPT_STEPS = 6
INTERRUPT_AT = 4  # checkpoint-4 is in stage 2 (stage 2 starts after step 2); the kill comes during step 5
INTERRUPT_ARGS: dict[str, Any] = {
    "sftkey": True,
    "sftkey_mode": "two_stage",
    "sftkey_stage2_steps": 2,
    "max_steps": INTERRUPT_STEPS,
    "save_steps": 2,
}
# the interrupted runs; with data weights, the stage-2 steps on either side of the kill weigh the key tokens by their
# message and example weights and the prompt tokens by the prompt weight
INTERRUPT_RUNS: dict[str, dict[str, Any]] = {
    "two_stage": INTERRUPT_ARGS,
    "two_stage_data": {**INTERRUPT_ARGS, **DATA_WEIGHTS},
}


def keyless_record(index: int) -> dict[str, Any]:
    """A conversational record whose completion has no recognisable answer (length varies with ``index``)."""
    return {
        "prompt": [{"role": "user", "content": "Say hello."}],
        "completion": [{"role": "assistant", "content": "Hello" + " there" * (index % 3) + "."}],
    }


def mixed_records(n: int = GLOBAL_BATCH * STEPS, seed: int = 21) -> list[dict[str, Any]]:
    """Tagged arithmetic records, with ``KEYLESS_ROWS`` replaced by records that have no key span."""
    records = arithmetic_records(n, seed=seed, form="prompt_completion")
    plain = [{"prompt": r["prompt"], "completion": r["completion"]} for r in records]
    return [keyless_record(i) if i in KEYLESS_ROWS else r for i, r in enumerate(plain)]


def with_data_weights(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` with an example weight ``score`` on each and a weight on every third completion message."""
    weighted = []
    for index, record in enumerate(records):
        completion = [{**m, "weight": 0.5 * (index % 4)} if index % 3 == 0 else m for m in record["completion"]]
        weighted.append({**record, "completion": completion, "score": 0.5 + 0.25 * (index % 5)})
    return weighted


def data_for(records: list[dict[str, Any]], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """``records`` with the data weights that ``settings`` (a run's arguments) read, if any."""
    return with_data_weights(records) if "sftkey_example_weight_field" in settings else records


class GradientRecorder(TrainerCallback):
    """Keeps a copy of every optimizer step's (already all-reduced, unclipped) gradients."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


METRIC_SUMS = 9  # the length of the vector of sftkey/* metric sums (sftkey_plugin.loss.key_metric_sums)


def record_micro_batches(trainer: Any) -> None:
    """Wrap ``trainer.compute_loss`` to note, per training micro-batch, this process's key-token count, stage, loss;
    and ``trainer.accelerator.gather`` to note the step of each gather of metric sums (``trainer.metric_gathers``)."""
    compute_loss = trainer.compute_loss
    gather = trainer.accelerator.gather
    trainer.micro_batches = []
    trainer.metric_gathers = []

    def counting_gather(tensor):  # type: ignore[no-untyped-def]
        if torch.is_tensor(tensor) and tensor.shape == (1, METRIC_SUMS):
            trainer.metric_gathers.append(trainer.state.global_step)
        return gather(tensor)

    trainer.accelerator.gather = counting_gather

    def recording(model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        if trainer.model.training:
            key = (inputs["sftkey_mask"][:, 1:] == 1) & (inputs["labels"][:, 1:] != -100)
            record = {"step": trainer.state.global_step, "stage": trainer.sftkey_stage, "key_tokens": int(key.sum())}
        result = compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if trainer.model.training:
            loss = result[0] if return_outputs else result
            trainer.micro_batches.append({**record, "loss": float(loss.detach())})
        return result

    trainer.compute_loss = recording


def comparable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FSDP2's sharded ``DTensor``s gathered to full tensors (a collective: every process calls it), under the
    parameter names of the unwrapped model (FSDP's activation checkpointing wraps each layer)."""
    return {
        n.replace("_checkpoint_wrapped_module.", ""): t.full_tensor() if isinstance(t, DTensor) else t
        for n, t in tensors.items()
    }


def training_record(trainer: Any, gradients: GradientRecorder) -> dict[str, Any]:
    """What a finished run is compared by: world size, train logs, gradients and final weights (full, also under
    FSDP), micro-batches; the distributed type and whether every parameter was a DTensor (FSDP falls back to DDP
    silently)."""
    parameters = dict(trainer.model.named_parameters())
    return {
        "world_size": trainer.accelerator.num_processes,
        "max_steps": trainer.state.max_steps,
        "num_train_epochs": trainer.state.num_train_epochs,
        "optim": str(trainer.args.optim),
        "learning_rate": trainer.args.learning_rate,
        "distributed_type": trainer.accelerator.distributed_type.value,
        "fsdp": trainer.is_fsdp_enabled,
        "sharded": all(isinstance(p, DTensor) for p in parameters.values()),
        "logs": [h for h in trainer.state.log_history if "loss" in h],
        "grads": [comparable(step) for step in gradients.steps],
        "weights": comparable({n: p.detach().clone() for n, p in parameters.items()}),
        "micro_batches": trainer.micro_batches,
        "metric_gathers": trainer.metric_gathers,
        "first_rows": [trainer.train_dataset[i] for i in range(GLOBAL_BATCH)],  # the first step's rows, in order
    }


def run_mode(tiny_dir: str, out: str, mode: str, per_device_batch: int, **overrides: Any) -> dict[str, Any]:
    """Train ``STEPS`` steps of ``mode`` on ``mixed_records``; return the logs, gradients and final weights.
    ``overrides``: more ``trainer_for`` arguments (gradient accumulation, the FSDP worker's)."""
    recorder = GradientRecorder()
    trainer = trainer_for(
        tiny_dir,
        data_for(mixed_records(), RUNS[mode]),
        out,
        sftkey=True,
        sftkey_on_missing="keep",
        max_steps=STEPS,
        per_device_train_batch_size=per_device_batch,
        max_grad_norm=0.0,  # compare raw gradients, not clipped ones
        **RUNS[mode],
        **overrides,
    )
    trainer.add_callback(recorder)
    record_micro_batches(trainer)
    trainer.train()
    return training_record(trainer, recorder)


def main_modes(tiny_dir: str, out_dir: str) -> None:
    """Every mode on this process group; rank 0 keeps the shared results, every rank its own micro-batches."""
    rank = int(os.environ.get("RANK", "0"))
    for mode in RUNS:
        result = run_mode(tiny_dir, str(Path(out_dir) / f"run-{mode}"), mode, GLOBAL_BATCH // 2)
        if rank == 0:
            torch.save(result, Path(out_dir) / f"{mode}.pt")
        torch.save(result["micro_batches"], Path(out_dir) / f"{mode}-rank{rank}.pt")


class StallAfterCheckpoint(TrainerCallback):
    """Once checkpoint-``step`` is on disk, announce it and hang in the next step until the test kills us."""

    def __init__(self, step: int, ready_file: str) -> None:
        self.step, self.ready_file = step, ready_file

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            Path(self.ready_file).write_text(str(os.getpid()))
            time.sleep(600)
        return control


def interrupt_records(run: str = "two_stage") -> list[dict[str, Any]]:
    """The data of the interrupted run ``run`` (6 steps of 4 rows)."""
    records = arithmetic_records(INTERRUPT_STEPS * GLOBAL_BATCH, seed=22, form="prompt_completion")
    return data_for(records, INTERRUPT_RUNS[run])


def main_interrupt(tiny_dir: str, out_dir: str, ready_file: str, run: str = "two_stage") -> None:
    """The run that gets killed: two_stage with checkpoints every 2 steps, stalling after checkpoint-4."""
    trainer = trainer_for(tiny_dir, interrupt_records(run), out_dir, save_strategy="steps", **INTERRUPT_RUNS[run])
    trainer.add_callback(StallAfterCheckpoint(INTERRUPT_AT, ready_file))
    trainer.train()


def main_rank0_log(tiny_dir: str, out_dir: str) -> None:
    """Two_stage for 4 steps, with a user's callback that logs on process 0 only after each optimizer step (where the
    step's sftkey/* sums are buffered; a log in on_step_end would also skip the trainer's own log, stock too)."""
    trainer = trainer_for(tiny_dir, mixed_records(), out_dir, sftkey=True, per_device_train_batch_size=2,
                          max_steps=STEPS, **MODES["two_stage"])  # fmt: skip

    class LogOnMainOnly(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if state.is_world_process_zero:
                trainer.log({"user/main_only": float(state.global_step + 1)})

    trainer.add_callback(LogOnMainOnly())
    trainer.train()
    if trainer.accelerator.is_main_process:
        torch.save(trainer.state.log_history, Path(out_dir) / "log_history.pt")


def main_refuse(tiny_dir: str, out_dir: str) -> None:
    """Keyless data with sftkey_on_missing=error: refused while the main process prepares the data first."""
    records = [keyless_record(i) for i in range(8)]
    trainer_for(tiny_dir, records, out_dir, sftkey=True, sftkey_on_missing="error", per_device_train_batch_size=2)


BAD_MASK_ERROR = "object is not iterable"  # TRL's build_labels zips the token ids with each mask


def main_bad_mask(tiny_dir: str, out_dir: str) -> None:
    """Pre-tokenised rows, one with an ``assistant_masks`` of None: TRL's own label building raises on it, inside
    the ``main_process_first`` TRL opens within SFTKey's (our preparation before it succeeds)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    records = []
    for index, record in enumerate(arithmetic_records(8, seed=23, form="text")):
        input_ids = tokenizer(record["text"])["input_ids"]
        records.append({"input_ids": input_ids, "assistant_masks": None if index == 5 else [1] * len(input_ids)})
    trainer_for(tiny_dir, records, out_dir, sftkey=True, per_device_train_batch_size=2)


if __name__ == "__main__":
    process_exit.install()
    command, *arguments = sys.argv[1:]
    commands = {
        "modes": main_modes,
        "interrupt": main_interrupt,
        "rank0_log": main_rank0_log,
        "refuse": main_refuse,
        "bad_mask": main_bad_mask,
    }
    commands[command](*arguments)
    process_exit.end_process_group()
