"""The Axolotl plugin: real ``axolotl train`` runs (CLI python entry) on the tiny fixtures; 2-process runs
(``axolotl train --launcher torchrun``) against 1-process runs and a run killed mid-stage-2 and resumed, checked as
``test_reliability.py`` checks the TRL side; the strategy's mask against the TRL side's (hostile completions too),
the validators, the dataset-cache suffix and the ``sftkey-preview`` command."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from packaging.version import Version

pytest.importorskip("axolotl")

pytestmark = pytest.mark.axolotl

PLUGIN = "sftkey_plugin.axolotl.SFTKeyPlugin"
N_RECORDS = 48
# Axolotl 0.21 loads the plugins of the ``axolotl.plugins`` entry-point group into every run, so there ``sftkey: true``
# alone enables SFTKey (0.19 needs the ``plugins:`` list). Runs use the form users write for the installed version;
# ``on_listed`` keeps the list on 0.21 (test_listed_and_discovered_plugin_train_identically).
DISCOVERY = Version(importlib.metadata.version("axolotl")) >= Version("0.21")
LISTED = [] if DISCOVERY else [PLUGIN]
LISTING = {"plugins": LISTED} if LISTED else {}


def _base_config(tiny_dir: str, data: str, prepared: str, output_dir: str) -> dict:
    return {
        "base_model": tiny_dir,
        "datasets": [{"path": data, "ds_type": "json", "type": "chat_template"}],
        "dataset_prepared_path": prepared,
        "output_dir": output_dir,
        "sequence_len": 256,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_steps": 4,
        "learning_rate": 0.002,
        "optimizer": "sgd",  # linear in the gradient: runs compared step by step stay within rounding (see test_trl)
        "lr_scheduler": "constant",
        "logging_steps": 1,
        "seed": 0,
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        # Axolotl seeds nothing before the LoRA init, so a random init depends on what ran before it (a dataset
        # prepared or loaded from the cache); OLoRA's QR init is deterministic, so runs can be compared exactly.
        "peft_init_lora_weights": "olora",
        "lora_target_linear": True,
        "lora_mlp_kernel": False,
        "lora_qkv_kernel": False,
        "lora_o_kernel": False,
        "lora_embedding_kernel": False,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "flash_attention": False,
        "attn_implementation": "sdpa",
        "gradient_checkpointing": False,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
        "save_strategy": "steps",  # checkpoint-4/trainer_state.json holds the log history
        "save_steps": 4,
        "val_set_size": 0,
        "dataset_num_proc": 1,
    }


SFTKEY_ON = {**LISTING, "sftkey": True, "sftkey_mode": "two_stage", "sftkey_stage2_steps": 2}
PHASES_ON = {**LISTING, "sftkey": True, "sftkey_mode": "phases", "sftkey_phase_unit": "steps"}
EVAL = {"val_set_size": 0.125, "eval_strategy": "steps", "eval_steps": 2}
PACKED = {"sample_packing": True, "micro_batch_size": 2, "pad_to_sequence_len": True}
RUNS = {
    "off": EVAL,
    "on": {**SFTKEY_ON, **EVAL},
    "on_ga": {**SFTKEY_ON, **EVAL, "micro_batch_size": 2, "gradient_accumulation_steps": 2},
    "off_packed": PACKED,
    "on_packed": {**SFTKEY_ON, **PACKED},
    "weighted_1_1": {
        **SFTKEY_ON,
        **EVAL,
        "sftkey_mode": "weighted",
        "sftkey_key_weight": 1.0,
        "sftkey_other_weight": 1.0,
    },
    # an instruction-style dataset: marked by the trainer from Axolotl's own tokens
    "alpaca": {**SFTKEY_ON, "datasets": "ALPACA"},
    # "on" written as its phases preset, and a soft stage 2 reached linearly
    "phases_two_stage": {**PHASES_ON, **EVAL,
                         "sftkey_phases": [{"start": 0, "key_weight": 1, "other_weight": 1},
                                           {"start": 2, "key_weight": 1, "other_weight": 0}]},
    "phases_soft": {**PHASES_ON, **EVAL, "sftkey_phase_interpolation": "linear",
                    "sftkey_phases": [{"start": 0, "key_weight": 1, "other_weight": 1},
                                      {"start": 2, "key_weight": 2, "other_weight": 0.1}]},
}  # fmt: skip
if DISCOVERY:
    RUNS["on_listed"] = {**RUNS["on"], "plugins": [PLUGIN]}


def _env() -> dict:
    return {
        **os.environ,
        "AXOLOTL_DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_DISABLED": "true",
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_dir):
    from sftkey_plugin.examples import arithmetic_records

    root = tmp_path_factory.mktemp("axolotl")
    records = arithmetic_records(N_RECORDS, seed=1, form="messages")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    alpaca = root / "alpaca.jsonl"
    rows = [{"instruction": r["prompt"], "input": "", "output": r["completion"]}
            for r in arithmetic_records(N_RECORDS, seed=2, form="prompt_completion_text")]  # fmt: skip
    alpaca.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return {"root": root, "data": str(data), "alpaca": str(alpaca), "records": records, "tiny_dir": tiny_dir}


def _config(workdir, name: str, overrides: dict) -> dict:
    root = workdir["root"]
    config = _base_config(workdir["tiny_dir"], workdir["data"], str(root / "prepared"), str(root / f"out_{name}"))
    config.update(copy.deepcopy(overrides))
    if config["datasets"] == "ALPACA":
        config["datasets"] = [{"path": workdir["alpaca"], "ds_type": "json", "type": "alpaca"}]
        config["dataset_prepared_path"] = str(root / "prepared_alpaca")  # apart from the chat datasets checked below
    return config


def _write(path: Path, config: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(workdir):
    """Run every config of RUNS through ``python -m axolotl.cli.train``, two at a time (2 cores)."""
    root = workdir["root"]
    pending = list(RUNS)
    active: dict[str, tuple[subprocess.Popen, Path]] = {}
    results = {}
    deadline = time.time() + 600
    while pending or active:
        while pending and len(active) < 2:
            name = pending.pop(0)
            path = _write(root / f"{name}.yml", _config(workdir, name, RUNS[name]))
            log = root / f"{name}.log"
            with log.open("w") as handle:
                process = subprocess.Popen(
                    [sys.executable, "-m", "axolotl.cli.train", str(path)],
                    cwd=root,
                    env=_env(),
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                )
            active[name] = (process, log)
        for name, (process, log) in list(active.items()):
            if process.poll() is not None:
                del active[name]
                output = log.read_text(errors="replace")
                state = root / f"out_{name}" / "checkpoint-4" / "trainer_state.json"
                history = json.loads(state.read_text())["log_history"] if state.exists() else None
                results[name] = {"rc": process.returncode, "output": output, "history": history}
        if time.time() > deadline:
            for process, _ in active.values():
                process.kill()
            pytest.fail(f"axolotl runs timed out: {list(active)}")
        time.sleep(0.5)
    return results


def _train_logs(history):
    return [entry for entry in history if "loss" in entry and "eval_loss" not in entry]


def test_runs_succeed(runs):
    for name, result in runs.items():
        assert result["rc"] == 0, f"{name} failed:\n{result['output'][-4000:]}"
        assert result["history"] is not None, name
        assert len(_train_logs(result["history"])) == 4, name


def test_plugin_off_logs_no_sftkey_metrics(runs):
    for name in ("off", "off_packed"):
        assert not any(key.startswith(("sftkey/", "eval_sftkey/")) for entry in runs[name]["history"] for key in entry)
        # nothing of the plugin's own (Axolotl 0.21 logs that it loaded sftkey_plugin.axolotl.SFTKeyPlugin)
        assert re.search(r"SFTKey(?!Plugin)", runs[name]["output"]) is None


@pytest.mark.parametrize("name", ["on", "on_ga", "on_packed", "alpaca"])
def test_stage_switches_at_configured_step(runs, name):
    logs = _train_logs(runs[name]["history"])
    assert [entry["sftkey/stage"] for entry in logs] == [1, 1, 2, 2]
    for entry in logs:
        assert 0 < entry["sftkey/key_fraction"] < 1
        assert "sftkey/key_loss" in entry and "sftkey/key_token_accuracy" in entry
    assert all("sftkey/reasoning_loss" in entry for entry in logs[:2])
    for entry in logs[2:]:  # stage 2: the loss is the mean NLL of the key tokens, nothing else is scored
        assert "sftkey/reasoning_loss" not in entry
        assert entry["loss"] == pytest.approx(entry["sftkey/key_loss"], rel=2e-3)
    output = runs[name]["output"]
    assert "SFTKey train data: " in output and "key span found in" in output
    assert "SFTKey: stage 2 (key answer tokens only) from optimizer step 3." in output


@pytest.mark.parametrize(("off", "on"), [("off", "on"), ("off_packed", "on_packed")])
def test_stage_one_is_plain_sft(runs, off, on):
    """Same seed, data and order: the first step (stage 1) has the plugin-off loss; stage 2 then differs."""
    off_logs, on_logs = _train_logs(runs[off]["history"]), _train_logs(runs[on]["history"])
    assert on_logs[0]["loss"] == pytest.approx(off_logs[0]["loss"], rel=1e-4)
    assert on_logs[0]["grad_norm"] == pytest.approx(off_logs[0]["grad_norm"], rel=1e-3)
    # stage 2's key-token gradient is another gradient (its loss, ~ln(vocab) on any token of this untrained model,
    # need not move much): on the unpacked runs its norm was 0.87 against 0.64
    assert on_logs[2]["grad_norm"] != pytest.approx(off_logs[2]["grad_norm"], rel=0.1)


def test_weighted_one_one_is_plain_sft(runs):
    """``weighted`` with 1.0/1.0 trains exactly like the plugin-off run, every step (and logs the metrics)."""
    off, weighted = _train_logs(runs["off"]["history"]), _train_logs(runs["weighted_1_1"]["history"])
    for plain, one_one in zip(off, weighted):
        assert one_one["loss"] == pytest.approx(plain["loss"], rel=1e-5)
        assert one_one["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)
        assert one_one["sftkey/stage"] == 1 and "sftkey/reasoning_loss" in one_one


def _without_timings(history):
    return [{k: v for k, v in entry.items() if "runtime" not in k and "per_sec" not in k} for entry in history]


def test_phases_preset_of_two_stage_trains_exactly_as_two_stage(runs):
    """The same computation through either key: every training and evaluation log bit-identical (timings aside)."""
    assert _without_timings(runs["phases_two_stage"]["history"]) == _without_timings(runs["on"]["history"])
    logs = _train_logs(runs["phases_two_stage"]["history"])
    assert [(entry["sftkey/key_weight"], entry["sftkey/other_weight"]) for entry in logs] == [
        (1, 1),
        (1, 1),
        (1, 0),
        (1, 0),
    ]
    assert (
        "SFTKey phases: steps 1-2: key tokens x1, other tokens x1; steps 3-4: key tokens x1, other tokens x0"
        in (runs["phases_two_stage"]["output"])
    )


def test_linear_phases_move_the_weights_step_by_step(runs):
    logs = _train_logs(runs["phases_soft"]["history"])  # the data and seed of "on"
    assert [entry["sftkey/key_weight"] for entry in logs] == [1, 1.5, 2, 2]
    assert [entry["sftkey/other_weight"] for entry in logs] == pytest.approx([1, 0.55, 0.1, 0.1])
    assert [entry["sftkey/stage"] for entry in logs] == [1, 1, 1, 1]
    assert all("sftkey/reasoning_loss" in entry and entry["loss"] > 0 for entry in logs)
    on = _train_logs(runs["on"]["history"])
    assert logs[0]["loss"] == on[0]["loss"] and logs[1]["loss"] != on[1]["loss"]  # weights apply from step 2


@pytest.mark.skipif(not DISCOVERY, reason="Axolotl 0.19 loads the plugin only from the plugins: list")
def test_listed_and_discovered_plugin_train_identically(runs):
    """Axolotl 0.21: ``sftkey: true`` alone (the entry point) and with ``plugins: [sftkey_plugin.axolotl.SFTKeyPlugin]``
    give the same run, every training and evaluation log bit-identical (timings aside)."""
    assert "plugins" not in RUNS["on"] and RUNS["on_listed"]["plugins"] == [PLUGIN]
    assert _without_timings(runs["on_listed"]["history"]) == _without_timings(runs["on"]["history"])
    assert any("sftkey/key_loss" in entry for entry in runs["on"]["history"])


def test_gradient_accumulation_is_exact(runs):
    """4 rows as one micro-batch or as 2 x 2 accumulated: the same loss in both stages (token-count normalised)."""
    single, accumulated = _train_logs(runs["on"]["history"]), _train_logs(runs["on_ga"]["history"])
    for one, two in zip(single, accumulated):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-3)


def test_eval_keeps_the_mask_and_logs_key_metrics(runs):
    evals = [entry for entry in runs["on"]["history"] if "eval_loss" in entry and entry["step"] in (2, 4)]
    assert len(evals) == 2
    for entry in evals:
        assert "eval_sftkey/key_loss" in entry and "eval_sftkey/reasoning_loss" in entry
        assert entry["eval_sftkey/stage"] in (1, 2)


def _prepared_with_sftkey(workdir):
    from datasets import load_from_disk

    folders = (Path(workdir["root"]) / "prepared").glob("sftkey-*/*")
    return [load_from_disk(str(p)) for p in folders if (p / "dataset_info.json").exists()]


def test_prepared_dataset_cached_under_marking_hash(runs, workdir):
    base = Path(workdir["root"]) / "prepared"
    suffixed = list(base.glob("sftkey-*"))
    assert len(suffixed) == 1, "one marking configuration: one sftkey-<hash> folder"
    for dataset in _prepared_with_sftkey(workdir):
        assert {"input_ids", "labels", "sftkey_mask", "sftkey_finder"} <= set(dataset.column_names)


def test_masks_match_trl_side(runs, workdir, tokenizer):
    """The mask Axolotl's own tokenisation carries equals ``tokenize_with_key_mask`` (TRL) on trained tokens."""
    from sftkey_plugin.tokenize import MarkingOptions, tokenize_with_key_mask

    expected = {}
    for record in workdir["records"]:
        marked = tokenize_with_key_mask(record, tokenizer, MarkingOptions())
        expected[tuple(marked["input_ids"])] = marked["sftkey_mask"]
    checked = 0
    for dataset in _prepared_with_sftkey(workdir):
        for row in dataset:
            trl_mask = expected[tuple(row["input_ids"])]  # same tokens as the TRL side
            trained = [label != -100 for label in row["labels"]]
            assert row["sftkey_mask"] == [int(m and t) for m, t in zip(trl_mask, trained)]
            assert sum(row["sftkey_mask"]) > 0 and row["sftkey_finder"] == "tags"
            checked += 1
    assert checked >= N_RECORDS


# ---- several processes and interruption: real `axolotl train` runs compared with test_reliability.py's checks --------

# Full fine-tuning (no LoRA init to vary), rows in file order (sequential sampler), raw gradients (no clipping).
# Axolotl 0.19 gives each process the accelerator LOCAL_RANK as device map, which fails without one; a CPU
# max_memory makes it infer a CPU map instead (the model loader's own path, no patch).
FULL_FINETUNE = {
    "curriculum_sampling": True,
    "shuffle_merged_datasets": False,
    "max_grad_norm": 0.0,
    "max_memory": {"cpu": "4GiB"},
    "sftkey": True,
}


def _full_finetune_config(workdir, name: str, overrides: dict) -> tuple[Path, dict]:
    """A full fine-tuning config with its own prepared-data folder, written to ``<name>.yml``."""
    config = _config(workdir, name, {**FULL_FINETUNE, **overrides})
    for key in [key for key in config if key == "adapter" or "lora" in key]:
        del config[key]
    config["dataset_prepared_path"] = str(workdir["root"] / f"prepared_{name}")
    return _write(workdir["root"] / f"{name}.yml", config), config


def _subprocess_env(**extra: str) -> dict:
    """``_env()`` plus test_reliability's child settings (``tests/`` on the path for the recorder plugins, CPU-only
    accelerate: without it no process group is set up) and the venv's scripts (Axolotl's launcher runs torchrun)."""
    from test_reliability import subprocess_env

    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**_env(), **subprocess_env(), "PATH": path, **extra}


def _train(command: list[str], workdir, processes: int = 1) -> str:
    """Run an Axolotl training command to completion, every process exiting cleanly (a hang fails after 300 s); its
    output."""
    from process_exit import run_processes

    done = run_processes(command, processes, cwd=workdir["root"], env=_subprocess_env(), timeout=300)
    return done.stdout + done.stderr


def _torchrun(config: Path, processes: int) -> list[str]:
    """``axolotl train`` of ``config`` on ``processes`` CPU processes."""
    command = [str(Path(sys.executable).parent / "axolotl"), "train", str(config), "--launcher", "torchrun", "--"]
    return [*command, "--standalone", "--nproc_per_node", str(processes)]


def _chat_datasets(workdir, name: str, records: list[dict]) -> list[dict]:
    """The ``datasets`` of a config that trains on a TRL run's prompt/completion ``records`` as chats."""
    data = workdir["root"] / f"{name}.jsonl"
    # a chat of the prompt and completion messages; the record's other columns (an example weight) kept
    rows = [{"messages": r.pop("prompt") + r.pop("completion"), **r} for r in records]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return [{"path": str(data), "ds_type": "json", "type": "chat_template"}]


def _multiprocess_run(workdir, name: str, overrides: dict, processes: int) -> dict:
    """Train one config with ``processes`` CPU processes on the TRL runs' ``mixed_records`` as chats, with the data
    weights the config reads (``multiprocess_worker.data_for``); each process's record (see ``axolotl_recorder``)."""
    from multiprocess_worker import GLOBAL_BATCH, STEPS, data_for, mixed_records

    path, config = _full_finetune_config(
        workdir,
        name,
        {
            "datasets": _chat_datasets(workdir, name, data_for(mixed_records(), overrides)),
            "plugins": ["axolotl_recorder.TrainingRecorder", *LISTED],
            "max_steps": STEPS,
            "micro_batch_size": GLOBAL_BATCH // processes,
            **overrides,
        },
    )
    _train(_torchrun(path, processes), workdir, processes)
    return {rank: torch.load(Path(config["output_dir"]) / f"record-rank{rank}.pt") for rank in range(processes)}


# weighted_data: the weighted mode (key 3.0, other 0.5) with message, example and prompt weights on the TRL run's
# records (multiprocess_worker.RUNS), so one launch pair covers the mode and the data weights
@pytest.mark.parametrize("mode", ["two_stage", "key_only", "weighted_data"])
@pytest.mark.multiprocess
def test_two_processes_equal_one_process(workdir, mode):
    """As the TRL test in test_reliability.py: same logs, gradients and weights; a process without key tokens."""
    from multiprocess_worker import RUNS
    from test_reliability import assert_same_training

    overrides = {key: value for key, value in RUNS[mode].items() if key.startswith("sftkey")}
    multi = _multiprocess_run(workdir, f"{mode}_2proc", overrides, processes=2)
    single = _multiprocess_run(workdir, f"{mode}_1proc", overrides, processes=1)
    if "sftkey_example_weight_field" in overrides:  # the data weights are on: their columns were kept for training
        assert all({"sftkey_weight", "sftkey_prompt"} <= row.keys() for row in single[0]["first_rows"])
    assert_same_training(mode, multi[0], single[0], [multi[0]["micro_batches"], multi[1]["micro_batches"]])


@pytest.mark.multiprocess
def test_two_processes_with_packing(workdir):
    """Multipack bins on 2 processes (no 1-process twin: bins are dealt out differently): every step's loss is the
    mean NLL of the key tokens of both processes, as the gathered ``sftkey/key_loss`` metric measures it."""
    packed = {"sftkey_mode": "key_only", "sample_packing": True, "pad_to_sequence_len": True, "sequence_len": 128}
    records = _multiprocess_run(workdir, "packed_2proc", {**packed, "micro_batch_size": 1}, processes=2)
    assert records[0]["world_size"] == 2
    assert all(math.isfinite(m["loss"]) for rank in records.values() for m in rank["micro_batches"])
    logs = records[0]["logs"]
    assert len(logs) == 4
    for entry in logs:
        assert entry["loss"] == pytest.approx(entry["sftkey/key_loss"], rel=1e-5)


def recorded_run(workdir, name: str, overrides: dict) -> dict:
    """Train a 1-process full fine-tuning config (no checkpoints) with ``axolotl_recorder.TrainingRecorder``: the
    process's record."""
    plugins = {"plugins": ["axolotl_recorder.TrainingRecorder", *LISTED], "save_strategy": "no", "save_steps": None}
    path, config = _full_finetune_config(workdir, name, {**plugins, **overrides})
    _train([sys.executable, "-m", "axolotl.cli.train", str(path)], workdir)
    return torch.load(Path(config["output_dir"]) / "record-rank0.pt")


def test_stage_by_epoch_switches_at_the_real_epoch_boundary_with_packing(workdir):
    """With sample_packing Axolotl sets max_steps from its own count of packed steps, which rounds the last partial
    accumulation step of an epoch down (16 bins, 3 accumulated: it plans 5 steps an epoch, the trainer runs 6);
    ``sftkey_stage2_epoch: 1`` still starts stage 2 with the first step of the second epoch (where the trainer's
    epoch counter reaches 1), not after max_steps / num_train_epochs steps."""
    overrides = {
        "sftkey_mode": "two_stage",
        "sftkey_stage2_epoch": 1,
        "num_epochs": 2,
        "max_steps": None,
        "sample_packing": True,
        "pad_to_sequence_len": True,
        "sequence_len": 192,
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 3,
    }
    record = recorded_run(workdir, "epoch_packed", overrides)
    epochs, stages = [h["epoch"] for h in record["logs"]], [h["sftkey/stage"] for h in record["logs"]]
    first = stages.index(2)
    print(f"\nAxolotl packed, 2 epochs: max_steps {record['max_steps']}, epochs {epochs}, stages {stages}")
    assert 0 < first < len(stages) and stages == [1] * first + [2] * (len(stages) - first)
    assert epochs[first - 1] == pytest.approx(1.0) and epochs[first] > 1.0
    # converted through max_steps / num_train_epochs, stage 2 would have started elsewhere
    assert math.ceil(record["max_steps"] / record["num_train_epochs"]) != first


FSDP_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "axolotl" / "gsm8k" / "qwen3-8b-base_fsdp_sftkey.yaml"


def _recipe_fsdp_block() -> dict:
    """The shipped recipe's ``fsdp_version`` / ``fsdp_config``, wrapping the tiny Llama's decoder layers instead of
    Qwen3's, with sharded checkpoints: saving a FULL_STATE_DICT checkpoint fails on CPU processes in the stock
    Trainer too ("Attempted to access the data pointer on an invalid python storage", see the README)."""
    import yaml

    recipe = yaml.safe_load(FSDP_RECIPE.read_text(encoding="utf-8"))
    fsdp_config = {**recipe["fsdp_config"], "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}
    assert fsdp_config["state_dict_type"] == "FULL_STATE_DICT"
    fsdp_config["state_dict_type"] = "SHARDED_STATE_DICT"
    return {"fsdp_version": recipe["fsdp_version"], "fsdp_config": fsdp_config}


@pytest.mark.multiprocess
def test_fsdp2_two_processes_equal_one_process(workdir):
    """The recipe's FSDP2 block on 2 CPU processes (really sharded: every parameter a DTensor) against 1 process
    without FSDP: the same logs, gradients after reduction and final weights. Plain SGD (``sharded_worker.SGD``).
    two_stage only (stage 1: the trainer's own loss; stage 2: key_only's masking): each Axolotl launch costs over a
    minute on 2 cores, and every mode runs under FSDP2 through the same loss code in test_sharded.py."""
    from multiprocess_worker import MODES
    from sharded_worker import SGD
    from test_reliability import assert_same_training

    mode = "two_stage"
    overrides = {key: value for key, value in MODES[mode].items() if key.startswith("sftkey")}
    overrides.update(optimizer=SGD["optim"], learning_rate=SGD["learning_rate"])
    fsdp = {
        **_recipe_fsdp_block(),
        "plugins": ["axolotl_recorder.AllowFSDPOnCPU", "axolotl_recorder.TrainingRecorder", *LISTED],
    }
    multi = _multiprocess_run(workdir, f"{mode}_fsdp_2proc", {**overrides, **fsdp}, processes=2)
    single = _multiprocess_run(workdir, f"{mode}_sgd_1proc", overrides, processes=1)
    assert multi[0]["fsdp"] and multi[0]["sharded"], "FSDP fell back to DDP"
    print(f"\nAxolotl FSDP2 (recipe block), 2 processes vs 1 (SGD lr {SGD['learning_rate']}):", end="")
    assert_same_training(mode, multi[0], single[0], [multi[0]["micro_batches"], multi[1]["micro_batches"]])


def test_killed_mid_stage_two_resumes_to_the_same_weights(workdir):
    """As test_reliability.py's TRL test with weights from the data (``two_stage_data``: the TRL run's records as
    chats, message, example and prompt weights): killed during step 5 (stage 2 from step 3), resumed from checkpoint-4
    with ``resume_from_checkpoint``, the run ends with the stages, losses, mean weights and weights of a run never
    stopped. Two_stage without data weights is not run apart (three more Axolotl launches); the TRL test runs both."""
    from multiprocess_worker import INTERRUPT_RUNS, interrupt_records
    from safetensors.torch import load_file
    from test_reliability import kill_when_ready, max_abs_diff

    run = "two_stage_data"
    interrupted = {
        "plugins": ["axolotl_recorder.StallAfterCheckpointPlugin", *LISTED],
        "datasets": _chat_datasets(workdir, "interrupted", interrupt_records(run)),
        **INTERRUPT_RUNS[run],
    }
    root = workdir["root"]
    train = [sys.executable, "-m", "axolotl.cli.train"]

    path, full = _full_finetune_config(workdir, "uninterrupted", interrupted)
    _train([*train, str(path)], workdir)

    path, killed = _full_finetune_config(workdir, "killed", interrupted)
    ready, out = root / "killed.ready", Path(killed["output_dir"])
    env = _subprocess_env(SFTKEY_STALL_AFTER_CHECKPOINT=f"4:{ready}")
    code = kill_when_ready([*train, str(path)], env, root / "killed.log", ready)
    assert ready.exists(), (root / "killed.log").read_text()[-3000:]
    assert code == -signal.SIGKILL
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    saved = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert [h["sftkey/stage"] for h in _train_logs(saved["log_history"])] == [1, 1, 2, 2]

    path = _write(root / "resumed.yml", {**killed, "resume_from_checkpoint": str(out / "checkpoint-4")})
    _train([*train, str(path)], workdir)

    histories = [json.loads((Path(c["output_dir"]) / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
                 for c in (full, killed)]  # fmt: skip
    resumed_logs, full_logs = _train_logs(histories[1]), _train_logs(histories[0])
    assert [h["sftkey/stage"] for h in resumed_logs] == [h["sftkey/stage"] for h in full_logs] == [1, 1, 2, 2, 2, 2]
    assert [h["loss"] for h in resumed_logs] == pytest.approx([h["loss"] for h in full_logs], rel=1e-6)
    # steps 1-4 logged by the killed run, 5-6 by the resumed one
    mean_weights = [h["sftkey/mean_weight"] for h in full_logs]
    assert [h["sftkey/mean_weight"] for h in resumed_logs] == pytest.approx(mean_weights, rel=1e-6)
    # the data weights reached the loss (two_stage alone weighs every trained token 1): dropped from both runs, the
    # comparisons above would still pass
    assert all(w != pytest.approx(1.0) for w in mean_weights)
    diff = max_abs_diff(*(load_file(Path(c["output_dir"]) / "model.safetensors") for c in (killed, full)))
    print(f"\nAxolotl resume after SIGKILL ({run}): mean weights {mean_weights}, max |weight diff| {diff:.2e}")
    assert diff < 1e-6


# ---- sftkey_on_missing: drop against a file without the dropped rows ------------------------------------------------

# Rows in file order (no shuffle, sequential packing sampler): the packed bins, so the step count, then depend only
# on which rows there are, not on a shuffle that differs between a file of 96 rows and one of 48.
DROP_RUN = {
    "max_steps": None,
    "num_epochs": 1,
    "micro_batch_size": 2,
    "shuffle_merged_datasets": False,
    "curriculum_sampling": True,
    "save_strategy": "epoch",  # checkpoint-<steps trained>/trainer_state.json
    "save_steps": None,
    "sftkey": True,
    "sftkey_finder": "tags",
}
DROP_PACKED = {"sample_packing": True, "pad_to_sequence_len": True, "micro_batch_size": 1}
DROP_LISTINGS = {"listed": {"plugins": [PLUGIN]}} | ({"entry_point": {}} if DISCOVERY else {})


@pytest.fixture(scope="module")
def drop_data(workdir) -> dict[str, str]:
    """48 chats with a tagged answer and 48 as long without the tags, interleaved; and the 48 keyed ones alone."""
    from sftkey_plugin.examples import arithmetic_records

    keyed = arithmetic_records(48, seed=4, form="messages")
    keyless = copy.deepcopy(arithmetic_records(48, seed=5, form="messages"))
    for record in keyless:
        answer = record["messages"][-1]
        for tag, plain in (("<Thinking>", ""), ("</Thinking>", ""), ("<Answer>", "Result: "), ("</Answer>", ".")):
            answer["content"] = answer["content"].replace(tag, plain)
    files = {}
    for name, records in (("mixed", [r for pair in zip(keyed, keyless) for r in pair]), ("clean", keyed)):
        path = workdir["root"] / f"drop_{name}.jsonl"
        path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
        files[name] = str(path)
    return files


def steps_of_the_epoch(output_dir: str) -> dict:
    """The steps a run trained (its one checkpoint, at the end of its epoch) and planned (``max_steps``)."""
    (checkpoint,) = Path(output_dir).glob("checkpoint-*")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    steps = len([entry for entry in state["log_history"] if "loss" in entry])
    assert steps == state["global_step"] == int(checkpoint.name.split("-")[1])
    return {"steps": steps, "max_steps": state["max_steps"]}


def trained_steps(workdir, name: str, data: str, overrides: dict) -> dict:
    """Run ``axolotl train`` on ``data`` to the end of its epoch: the steps it trained and planned, and its output."""
    config = _config(workdir, name, {**DROP_RUN, **overrides})
    config["datasets"] = [{"path": data, "ds_type": "json", "type": "chat_template"}]
    config["dataset_prepared_path"] = str(workdir["root"] / f"prepared_{name}")
    path = _write(workdir["root"] / f"{name}.yml", config)
    done = subprocess.run([sys.executable, "-m", "axolotl.cli.train", str(path)], cwd=workdir["root"], env=_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    return {**steps_of_the_epoch(config["output_dir"]), "output": output}


@pytest.fixture(scope="module")
def clean_runs(workdir, drop_data) -> dict:
    """Axolotl's own count for the file without the rows to drop: ``sftkey_on_missing: keep`` (nothing is missing),
    so the plugin leaves the loading and the step count to Axolotl; one run per packing setting, made when needed."""
    runs: dict = {}

    def run(packed: bool) -> dict:
        if packed not in runs:
            overrides = {**LISTING, "sftkey_on_missing": "keep", **(DROP_PACKED if packed else {})}
            runs[packed] = trained_steps(
                workdir, f"clean_{'packed' if packed else 'padded'}", drop_data["clean"], overrides
            )
        return runs[packed]

    return run


@pytest.mark.parametrize("listing", list(DROP_LISTINGS))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_drop_trains_the_steps_of_a_file_without_the_dropped_rows(workdir, drop_data, clean_runs, listing, packed):
    """``sftkey_on_missing: drop`` with ``num_epochs`` and no ``max_steps``: exactly the optimizer steps Axolotl plans
    and trains for the file without those rows, with and without ``sample_packing``, the plugin listed under
    ``plugins:`` or (Axolotl 0.21) loaded from its entry point by ``sftkey: true`` alone. Axolotl caches the token
    count and packing efficiency of the first count in the config; a recount that reused them planned the steps of
    all 96 rows, as a float that stopped the run at its first step."""
    name = f"drop_{'packed' if packed else 'padded'}_{listing}"
    overrides = {**DROP_LISTINGS[listing], "sftkey_on_missing": "drop", **(DROP_PACKED if packed else {})}
    dropped = trained_steps(workdir, name, drop_data["mixed"], overrides)
    clean = clean_runs(packed)
    print(f"\nAxolotl drop ({name}): {dropped['steps']} steps; file without the dropped rows: {clean['steps']}")
    assert "SFTKey: dropped 48 of 96 train examples without a key span" in dropped["output"]
    assert dropped["steps"] == dropped["max_steps"] == clean["steps"] == clean["max_steps"]
    assert clean["steps"] >= 6  # several steps, which the 48 dropped rows would have doubled


@pytest.mark.multiprocess
def test_drop_on_two_processes_trains_the_steps_of_a_file_without_the_dropped_rows(workdir, drop_data):
    """The same with ``sample_packing`` on 2 processes (full fine-tuning; one prepared-data folder): the main process
    marks and drops first, then the other, which writes the filter's cache file beside the prepared dataset it loaded;
    both count the kept rows' steps (Axolotl gathers the packing efficiency over the processes) as for the file
    without the dropped rows, and every process exits cleanly."""
    runs = {}
    for name, on_missing in (("mixed", "drop"), ("clean", "keep")):
        overrides = {**DROP_RUN, **DROP_PACKED, "sftkey_on_missing": on_missing,
                     "plugins": ["axolotl_recorder.CleanExitPlugin", PLUGIN],
                     "datasets": [{"path": drop_data[name], "ds_type": "json", "type": "chat_template"}]}  # fmt: skip
        path, config = _full_finetune_config(workdir, f"drop_2proc_{name}", overrides)
        output = _train(_torchrun(path, 2), workdir, processes=2)
        runs[name] = {**steps_of_the_epoch(config["output_dir"]), "output": output}
    (dataset,) = [p.parent for p in Path(workdir["root"], "prepared_drop_2proc_mixed").glob("sftkey-*/*/state.json")]
    assert list(dataset.glob("cache-*.arrow")), "the filter's cache beside the shared prepared dataset"
    print(f"\nAxolotl drop on 2 processes: {runs['mixed']['steps']} steps; without the rows: {runs['clean']['steps']}")
    assert runs["mixed"]["output"].count("SFTKey: dropped 48 of 96 train examples without a key span") == 2
    assert runs["mixed"]["steps"] == runs["mixed"]["max_steps"] == runs["clean"]["steps"] == runs["clean"]["max_steps"]
    assert runs["clean"]["steps"] >= 3


# ---- in-process: config loading, strategy, validators, preview ----------------------------------------------


def fresh_axolotl_plugins() -> None:
    """Forget the plugins that earlier configs of this process registered, as a new ``axolotl train`` process has
    none: Axolotl's ``PluginManager`` is a process-wide singleton, and 0.21 merges the keys and validators of every
    plugin it holds into each later config (and caches the entry points it read)."""
    from axolotl.integrations import base

    base.PluginManager._instance = None
    reset = getattr(base, "reset_plugin_entry_points_cache", None)  # Axolotl >= 0.21
    if reset is not None:
        reset()


@pytest.fixture(scope="module")
def axolotl_env():
    os.environ.update({k: v for k, v in _env().items() if k != "OMP_NUM_THREADS"})
    from axolotl.cli.config import load_cfg
    from axolotl.utils.dict import DictDefault

    def load(config: dict):
        fresh_axolotl_plugins()
        return load_cfg(DictDefault(copy.deepcopy(config)))

    return load


def _strategy(axolotl_env, config: dict):
    from axolotl.loaders import load_tokenizer
    from axolotl.prompt_strategies import load as load_strategy

    cfg = axolotl_env(config)
    tokenizer = load_tokenizer(cfg)
    return cfg, tokenizer, load_strategy(cfg.datasets[0].type, tokenizer, cfg, cfg.datasets[0])


def _tokenize(strategy, records):
    batch = {key: [record[key] for record in records] for key in records[0]}
    out = strategy.tokenize_prompt(batch)
    return [dict(zip(out, values)) for values in zip(*out.values())]


MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "Work step by step."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "<Thinking>2 + 3 = 5.</Thinking>\n<Answer>5</Answer>"},
        {"role": "user", "content": "And 5 - 1?"},
        {"role": "assistant", "content": "<Thinking>5 - 1 = 4.</Thinking>\n<Answer>4</Answer>"},
    ]
}
NO_KEY = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello there."}]}


def _assert_marked_as_trl(tokenizer, records, rows):
    """Each Axolotl row has the TRL side's tokens, and its key mask is the TRL side's restricted to trained tokens."""
    from sftkey_plugin.tokenize import MarkingOptions, tokenize_with_key_mask

    assert len(rows) == len(records)
    for record, row in zip(records, rows):
        marked = tokenize_with_key_mask(record, tokenizer, MarkingOptions(finder="tags"))
        assert marked["input_ids"] == row["input_ids"]
        assert len(row["sftkey_mask"]) == len(row["input_ids"])
        assert row["sftkey_mask"] == [int(m and lab != -100) for m, lab in zip(marked["sftkey_mask"], row["labels"])]


def test_strategy_matches_trl_and_handles_missing(axolotl_env, workdir):
    config = _config(workdir, "strategy", {**SFTKEY_ON, "sftkey_finder": "tags"})
    cfg, tokenizer, strategy = _strategy(axolotl_env, config)
    assert cfg.datasets[0].type == "sftkey_plugin.axolotl.strategy"  # rewritten from chat_template
    assert "/sftkey-" in str(cfg.dataset_prepared_path)
    rows = _tokenize(strategy, [MULTI_TURN, NO_KEY])
    _assert_marked_as_trl(tokenizer, [MULTI_TURN, NO_KEY], rows)
    key_text = tokenizer.decode([t for t, m in zip(rows[0]["input_ids"], rows[0]["sftkey_mask"]) if m])
    assert key_text == "\n<Answer>5</Answer><|im_end|>\n<Answer>4</Answer><|im_end|>"  # every trained assistant turn
    assert (rows[0]["sftkey_turns"], rows[0]["sftkey_turns_found"]) == (2, 2)
    _, _, last_only = _strategy(axolotl_env, {**config, "sftkey_turns": "last"})
    row = _tokenize(last_only, [MULTI_TURN])[0]
    assert tokenizer.decode([t for t, m in zip(row["input_ids"], row["sftkey_mask"]) if m]) == (
        "\n<Answer>4</Answer><|im_end|>"
    )
    assert rows[1]["sftkey_mask"] == [0] * len(rows[1]["input_ids"]) and rows[1]["sftkey_finder"] == ""

    # rows without a key are kept here, so that sftkey_min_found counts them; SFTKeyPlugin.load_datasets drops them
    _, _, dropping = _strategy(axolotl_env, {**config, "sftkey_on_missing": "drop"})
    assert len(_tokenize(dropping, [MULTI_TURN, NO_KEY])) == 2
    _, _, strict = _strategy(axolotl_env, {**config, "sftkey_on_missing": "error"})
    with pytest.raises(ValueError, match="no key answer found"):
        _tokenize(strict, [NO_KEY])


def test_hostile_completions_are_marked_as_on_the_trl_side(axolotl_env, workdir):
    """test_reliability.py's hostile completions, as chats through the Axolotl strategy: the TRL side's key tokens
    (those Axolotl trains), and no key token exactly where the TRL side counts the example without a key span."""
    from test_reliability import HOSTILE_COMPLETIONS, THINK

    records = [
        {"messages": [{"role": "user", "content": "Q: 1 + 1?"}, {"role": "assistant", "content": completion}]}
        for completion, _ in HOSTILE_COMPLETIONS.values()
    ]
    records[list(HOSTILE_COMPLETIONS).index("no answer, tags only in the prompt")]["messages"][0]["content"] += (
        THINK + "<Answer>2"
    )
    _, tokenizer, strategy = _strategy(axolotl_env, _config(workdir, "hostile", SFTKEY_ON))
    rows = _tokenize(strategy, records)
    _assert_marked_as_trl(tokenizer, records, rows)
    assert [any(row["sftkey_mask"]) for row in rows] == [bool(key) for _, key in HOSTILE_COMPLETIONS.values()]


def test_sftkey_off_or_unlisted_changes_nothing(axolotl_env, workdir):
    """``sftkey: true`` without ``plugins:`` is SFTKey on Axolotl 0.21 (the entry point) and dropped silently by 0.19
    (no discovery; ``axolotl sftkey-preview`` warns). ``sftkey: false``, listed or not, leaves Axolotl's config."""
    from axolotl.integrations.base import PluginManager

    from sftkey_plugin.axolotl.trainer import SFTKeyAxolotlTrainer

    plain = _config(workdir, "plain", {})
    assert "plugins" not in plain
    cfg = axolotl_env({**plain, "sftkey": True})
    trainer_cls = PluginManager.get_instance().get_trainer_cls(cfg)
    if DISCOVERY:
        assert cfg.sftkey is True and trainer_cls is SFTKeyAxolotlTrainer
        assert cfg.datasets[0].type == "sftkey_plugin.axolotl.strategy" and "/sftkey-" in str(cfg.dataset_prepared_path)
    else:
        assert cfg.sftkey is None and trainer_cls is None and cfg.datasets[0].type == "chat_template"
    for off in ({**plain, "plugins": [PLUGIN], "sftkey": False}, {**plain, "sftkey": False}, plain):
        cfg = axolotl_env(off)
        assert cfg.dataset_prepared_path == plain["dataset_prepared_path"] and cfg.datasets[0].type == "chat_template"
        assert PluginManager.get_instance().get_trainer_cls(cfg) is None


def test_marking_options_change_the_cache_folder(axolotl_env, workdir):
    config = _config(workdir, "cache", SFTKEY_ON)
    paths = {
        "default": axolotl_env(config).dataset_prepared_path,
        "same": axolotl_env({**config, "sftkey_stage2_steps": 3}).dataset_prepared_path,  # not a marking option
        "finder": axolotl_env({**config, "sftkey_finder": "answer_is"}).dataset_prepared_path,
        "options": axolotl_env(
            {**config, "sftkey_finder": "regex", "sftkey_finder_options": {"pattern": "<Answer>(?P<key>.*?)</Answer>"}}
        ).dataset_prepared_path,
        "edge": axolotl_env({**config, "sftkey_edge_tokens": "exclude"}).dataset_prepared_path,
    }
    assert paths["default"] == paths["same"]
    assert len({paths[k] for k in ("default", "finder", "options", "edge")}) == 4
    assert all(str(p).startswith(config["dataset_prepared_path"] + "/sftkey-") for p in paths.values())


REFUSED = [
    ({"context_parallel_size": 2}, "context_parallel_size: 2"),
    ({"context_parallel": {"size": 2}}, "context_parallel: {size: 2}"),  # Axolotl 0.21's block
    ({"balance_labels": True}, "balance_labels: true"),  # Axolotl 0.21
    ({"tensor_parallel_size": 2}, "tensor_parallel_size: 2"),
    ({"rl": "dpo"}, "rl: dpo"),
    ({"reward_model": True}, "reward_model"),
    ({"process_reward_model": True}, "process_reward_model"),
    ({"streaming": True}, "streaming: true"),
    ({"pretraining_dataset": "some/corpus"}, "pretraining_dataset"),
    ({"skip_prepare_dataset": True}, "skip_prepare_dataset: true"),
    ({"batch_flattening": True}, "batch_flattening: true"),
    ({"processor_type": "AutoProcessor"}, "processor_type"),
    ({"excess_length_strategy": "truncate"}, "excess_length_strategy: truncate"),
    ({"use_eaft": True}, "use_eaft: true"),
    ({"trainer_cls": "my.Trainer"}, "trainer_cls"),
    ({"sftkey_stage2_ratio": 2.0}, "sftkey_stage2_ratio must be in"),
    ({"sftkey_mode": "fancy"}, "sftkey_mode"),
]


@pytest.mark.parametrize(("overrides", "message"), REFUSED, ids=[m for _, m in REFUSED])
def test_validators_refuse_with_what_to_change(axolotl_env, workdir, overrides, message):
    config = {**_config(workdir, "refused", SFTKEY_ON), **copy.deepcopy(overrides)}
    with pytest.raises(Exception) as error:
        axolotl_env(config)
    assert message in str(error.value)
    if "must be in" not in message and "sftkey_mode" not in message:
        assert "SFTKey (sftkey: true) cannot be used with" in str(error.value)


def test_preview_command(axolotl_env, workdir):
    """``axolotl sftkey-preview`` through Axolotl's own CLI group (the entry point resolved as installed, or
    registered here the way ``axolotl.cli_commands`` would)."""
    from axolotl.cli.main import cli
    from axolotl.cli.plugins import PluginCommand
    from click.testing import CliRunner

    commands = cli.plugin_commands()
    commands.setdefault("sftkey-preview", PluginCommand(target="sftkey_plugin.axolotl.preview:sftkey_preview"))
    root = Path(workdir["root"])
    config = {**_config(workdir, "preview", SFTKEY_ON), "plugins": [PLUGIN]}
    unlisted = {k: v for k, v in config.items() if k != "plugins"}
    runner = CliRunner()
    fresh_axolotl_plugins()
    result = runner.invoke(
        cli, ["sftkey-preview", str(_write(root / "preview.yml", unlisted)), "-n", "2", "--no-color"]
    )
    assert result.exit_code == 0, result.output
    output = result.output
    if DISCOVERY:  # Axolotl loads the plugin from its entry point: the config is complete
        assert "WARNING" not in output and "previewing as if" not in output
    else:
        assert "WARNING: the config sets sftkey" in output and PLUGIN in output
    assert f"SFTKey datasets[0] {workdir['data']} data: {N_RECORDS} examples, key span found in {N_RECORDS}" in output
    assert "[tags " in output and "key of" in output
    assert output.count("--- example ") == 2
    answer = workdir["records"][0]["answer"]
    assert "[[" in output and f"<Answer>{answer}</Answer><|im_end|>]]" in output

    fresh_axolotl_plugins()
    result = runner.invoke(cli, ["sftkey-preview", str(_write(root / "preview_on.yml", config)), "-n", "0"])
    assert result.exit_code == 0, result.output
    assert "WARNING" not in result.output and "key span found in" in result.output


def test_validator_refuses_fused_loss_in_weighted_mode(axolotl_env, workdir):
    """Runs last of the validator tests: it registers the Liger plugin in Axolotl's plugin singleton."""
    config = _config(workdir, "liger", {**SFTKEY_ON, "sftkey_mode": "weighted", "sftkey_key_weight": 3.0})
    config["plugins"] = [PLUGIN, "axolotl.integrations.liger.LigerPlugin"]
    config["liger_fused_linear_cross_entropy"] = True
    with pytest.raises(Exception, match="liger_fused_linear_cross_entropy: true in sftkey_mode: weighted"):
        axolotl_env(config)
    axolotl_env({**config, "sftkey_mode": "two_stage"})  # the fused loss is kept where no per-token loss is needed
    axolotl_env({**config, "sftkey_key_weight": 1.0})  # weighted 1.0/1.0 weighs nothing
