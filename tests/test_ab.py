"""``sftkey ab``: the plan, the run (real ``sftkey train`` and ``axolotl train`` subprocesses on the tiny model, 2
arms x 2 seeds x 3 steps), resuming after a kill, the LoRA adapter evaluated, and every bad input refused before
training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sftkey_plugin.cli.main import main as sftkey
from sftkey_plugin.examples import arithmetic_records

yaml = pytest.importorskip("yaml")
pytest.importorskip("trl")

STEPS = 3
ARMS_FILE = {
    "mine": {"sftkey_mode": "weighted", "sftkey_key_weight": 3.0},
    # valid keys that fail at training: no completion holds a boxed answer
    "broken": {"sftkey_finder": "boxed", "sftkey_on_missing": "error"},
}
LOOP_ARMS = "sft,mine,broken"


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trl_setup(tiny_dir, tmp_path_factory) -> dict:
    """A TRL YAML (the tiny model with LoRA, 12 rows in batches of 4, one epoch: 3 steps), an eval set, an arms file."""
    root = tmp_path_factory.mktemp("ab_trl")
    config = {
        "model_name_or_path": tiny_dir,
        "dataset_name": str(_write_jsonl(root / "train.jsonl", arithmetic_records(12, seed=3))),
        "dtype": "float32",
        "bf16": False,
        "num_train_epochs": 1,  # ab counts the steps: 3
        "per_device_train_batch_size": 4,
        "optim": "sgd",
        "learning_rate": 0.5,
        "lr_scheduler_type": "constant",
        "max_length": 128,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "dataset_num_proc": 1,
        "dataloader_num_workers": 0,
        "use_peft": True,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj"],
        "output_dir": "unused",
    }
    return {
        "root": root,
        "config": _write_yaml(root / "config.yaml", config),
        "keys": config,
        "eval": _write_jsonl(root / "eval.jsonl", arithmetic_records(6, seed=9)),
        "arms_file": _write_yaml(root / "arms.yaml", ARMS_FILE),
    }


def _ab_args(setup: dict, out: Path, *extra: str, arms: str = "sft,mine", seeds: str = "0,1") -> list[str]:
    return [
        "ab",
        str(setup["config"]),
        "--eval",
        str(setup["eval"]),
        "--arms",
        arms,
        "--arms-file",
        str(setup["arms_file"]),
        "--seeds",
        seeds,
        "--out",
        str(out),
        "--max-new-tokens",
        "16",
        *extra,
    ]


def _mtimes(out: Path) -> dict[str, int]:
    return {path.parent.name: path.stat().st_mtime_ns for path in out.glob("runs/*/trained.json")}


@pytest.fixture(scope="module")
def trl_run(trl_setup) -> dict:
    """``sftkey ab`` killed (its whole process group, SIGKILL) once the second unit trains, one unit trained by its own
    command, then the same ``sftkey ab`` again to the end; the arm ``broken`` fails in every seed."""
    out = trl_setup["root"] / "out"
    second = out / "runs" / "mine-seed0"
    command = [sys.executable, "-m", "sftkey_plugin.cli.main", *_ab_args(trl_setup, out, arms=LOOP_ARMS)]
    log = trl_setup["root"] / "killed.log"
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while not (second / "train.log").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed = {"log": log.read_text(), "mtimes": _mtimes(out), "second_trained": (second / "trained.json").exists()}
    plan = json.loads((out / "plan.json").read_text())
    # a unit not begun yet trained by its planned command, as a cluster job would: the rerun keeps it
    cluster = next(unit for unit in plan["units"] if unit["name"] == "sft-seed1")
    subprocess.run(cluster["command"], check=True, capture_output=True)
    adapter = out / cluster["dir"] / "model" / "adapter_model.safetensors"
    killed["cluster_mtime"] = adapter.stat().st_mtime_ns
    code = sftkey(_ab_args(trl_setup, out, arms=LOOP_ARMS))
    killed["cluster_mtime_after"] = adapter.stat().st_mtime_ns
    return {"out": out, "killed": killed, "code": code, "plan": plan}


def test_the_run_killed_mid_unit_resumes_without_retraining(trl_run):
    killed = trl_run["killed"]
    assert list(killed["mtimes"]) == ["sft-seed0"], killed["log"][-3000:]  # killed during the second unit
    assert not killed["second_trained"]
    after = _mtimes(trl_run["out"])
    assert sorted(after) == ["mine-seed0", "mine-seed1", "sft-seed0", "sft-seed1"]
    assert after["sft-seed0"] == killed["mtimes"]["sft-seed0"]  # not retrained


def test_a_unit_trained_by_its_planned_command_is_kept(trl_run):
    """The cluster workflow: a unit trained outside ``sftkey ab`` by the command its plan printed is recorded from its
    Trainer state, not trained again."""
    killed = trl_run["killed"]
    assert "sft-seed1" not in killed["mtimes"] and killed["cluster_mtime_after"] == killed["cluster_mtime"]
    trained = json.loads((trl_run["out"] / "runs" / "sft-seed1" / "trained.json").read_text())
    assert trained["steps"] == STEPS and trained["seconds"] > 0
    assert not (trl_run["out"] / "runs" / "sft-seed1" / "train.log").exists()  # no training of ours


def test_a_failing_unit_is_recorded_and_the_others_go_on(trl_run):
    out = trl_run["out"]
    assert trl_run["code"] == 1
    for seed in (0, 1):
        failed = json.loads((out / "runs" / f"broken-seed{seed}" / "failed.json").read_text())
        assert failed["stage"] == "train" and failed["returncode"] != 0
        assert "12 of 12 train examples have no key span" in failed["log_tail"]
    assert not list(out.glob("runs/broken-*/trained.json"))
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").exists() and "broken-seed0" in json.dumps(report)
    (out / "report.json").unlink()
    assert sftkey(["ab", "report", str(out)]) == 0 and (out / "report.json").exists()


def test_every_unit_trains_the_planned_steps_with_its_arm(trl_run):
    """The epochs counted once (12 rows / 4 = 3 steps), every unit exactly that many; each arm's SFTKey metrics."""
    plan, out = trl_run["plan"], trl_run["out"]
    assert plan["max_steps"] == STEPS and plan["framework"] == "trl" and plan["baseline"] == "sft"
    assert plan["arms"] == {"sft": {"sftkey": False}, **{arm: {"sftkey": True, **ARMS_FILE[arm]} for arm in ARMS_FILE}}
    for unit in _trained(plan):
        trained = json.loads((out / unit["dir"] / "trained.json").read_text())
        assert trained["steps"] == STEPS
        losses = [entry for entry in trained["log_history"] if "loss" in entry]
        assert len(losses) == STEPS
        assert all(("sftkey/key_weight" in entry) == (unit["arm"] == "mine") for entry in losses)


def _trained(plan: dict) -> list[dict]:
    return [unit for unit in plan["units"] if unit["arm"] != "broken"]


def test_the_plan_configs_are_what_trained(trl_run):
    """Each unit's YAML against the arguments its training saved (training_args.bin): the plan's seed, steps, output
    folder and sftkey_* keys, the user's other keys as written."""
    import torch

    plan, out = trl_run["plan"], trl_run["out"]
    user = yaml.safe_load(Path(plan["config"]).read_text())
    for unit in _trained(plan):
        config = yaml.safe_load((out / unit["config"]).read_text())
        changed = {key for key in config if config[key] != user.get(key)}
        assert changed <= {"seed", "data_seed", "output_dir", "max_steps", *plan["arms"][unit["arm"]]}
        args = torch.load(out / unit["dir"] / "model" / "training_args.bin", weights_only=False)
        for key, value in config.items():
            if hasattr(args, key) and key != "report_to":
                saved = getattr(args, key)
                assert getattr(saved, "value", saved) == value, key
        assert (args.seed, args.data_seed, args.max_steps) == (unit["seed"], unit["seed"], STEPS)
        assert unit["command"] == [
            sys.executable, "-m", "sftkey_plugin.cli.train", "--config", str(out / unit["config"]),
        ]  # fmt: skip


def test_lora_units_are_evaluated_through_their_adapter(trl_run):
    plan, out = trl_run["plan"], trl_run["out"]
    for unit in _trained(plan):
        folder = out / unit["dir"]
        assert (folder / "model" / "adapter_config.json").exists()
        assert not (folder / "model" / "model.safetensors").exists()
        summary = json.loads((folder / "eval.summary.json").read_text())
        assert summary["examples"] == 6 and summary["model"] == str(folder / "model")
        rows = [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines()]
        assert len(rows) == 6 and all({"correct", "format_ok"} <= set(row) for row in rows)


def _refused(capsys, argv: list[str]) -> str:
    assert sftkey(argv) == 2
    return capsys.readouterr().err


def test_bad_input_is_refused_before_anything_trains(trl_setup, tmp_path, capsys):
    """Each refusal names its cause, and nothing is planned or trained."""
    out = tmp_path / "out"
    no_gold = _write_jsonl(tmp_path / "no_gold.jsonl", [{"prompt": [{"role": "user", "content": "1+1?"}]}] * 2)
    err = _refused(capsys, [*_ab_args(trl_setup, out)[:3], str(no_gold), *_ab_args(trl_setup, out)[4:]])
    assert "no_gold.jsonl: 2 of 2 records have no gold answer (no 'answer' field" in err
    assert "unknown arm 'sideways'" in _refused(capsys, _ab_args(trl_setup, out, arms="sft,sideways"))
    err = _refused(capsys, _ab_args(trl_setup, out, arms="sft,sft_steps_2x"))
    assert "unknown arm 'sft_steps_2x' (it changes the steps or the learning rate: not equal compute)" in err
    clashing = _write_yaml(tmp_path / "clash.yaml", {**trl_setup["keys"], "sftkey_key_weight": 2, "sftkey": True})
    err = _refused(capsys, ["ab", str(clashing), *_ab_args(trl_setup, out)[2:]])
    assert "clash.yaml already sets sftkey, sftkey_key_weight, which the arms set" in err
    misspelt = _write_yaml(tmp_path / "misspelt.yaml", {**trl_setup["keys"], "learning_rat": 0.1})
    err = _refused(capsys, ["ab", str(misspelt), *_ab_args(trl_setup, out)[2:]])
    assert "trl rejects misspelt.yaml as the baseline arm: unknown keys ['learning_rat']" in err
    axolotl = _write_yaml(tmp_path / "axolotl.yaml", {"base_model": "m", "datasets": [], "save_strategy": "no"})
    err = _refused(capsys, ["ab", str(axolotl), *_ab_args(trl_setup, out)[2:]])
    assert "axolotl.yaml: save_strategy: no leaves no trainer_state.json" in err
    bad_arm = _write_yaml(tmp_path / "bad_arm.yaml", {"odd": {"sftkey_mode": "sideways"}})
    err = _refused(capsys, _ab_args(trl_setup, out, "--arms-file", str(bad_arm), arms="sft,odd"))
    assert "trl rejects config.yaml with arm 'odd': " in err and "sideways" in err
    assert not out.exists()


def test_an_out_holding_another_plan_is_refused(trl_setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert sftkey(_ab_args(trl_setup, out, "--dry-run")) == 0
    plan = (out / "plan.json").read_text()
    assert "sftkey ab report" in capsys.readouterr().out
    assert sftkey(_ab_args(trl_setup, out, "--dry-run")) == 0  # the same plan again: accepted
    err = _refused(capsys, _ab_args(trl_setup, out, "--dry-run", seeds="0,2"))
    assert f"{out} holds another plan (use another --out): seeds: [0, 1] in OUT, [0, 2] now" in err
    assert (out / "plan.json").read_text() == plan and not list(out.glob("runs/*/train.log"))


@pytest.mark.axolotl
def test_axolotl_loop(tiny_dir, tmp_path):
    """An Axolotl config that counts epochs (12 rows in micro-batches of 4: Axolotl's own count, 3 steps), 2 arms
    through `axolotl train --launcher python` (one seed: each unit costs ~40 s here, and the seeds' loop is the TRL
    test's): the plugin listed for the SFTKey arm, every unit the planned steps, each model card holding the plan's
    YAML, each LoRA adapter (with the base's config.json beside it) evaluated."""
    pytest.importorskip("axolotl")
    import torch

    config = {
        "base_model": tiny_dir,
        "datasets": [{"path": str(_write_jsonl(tmp_path / "train.jsonl", arithmetic_records(12, seed=3))),
                      "ds_type": "json", "type": "chat_template"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": "unused",
        "sequence_len": 256,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "learning_rate": 0.002,
        "optimizer": "sgd",
        "lr_scheduler": "constant",
        "logging_steps": 1,
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_linear": True,
        "lora_mlp_kernel": False,  # Axolotl's LoRA kernels need CUDA
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
        "val_set_size": 0,
        "dataset_num_proc": 1,
    }  # fmt: skip
    path = _write_yaml(tmp_path / "axolotl.yaml", config)
    eval_data = _write_jsonl(tmp_path / "eval.jsonl", arithmetic_records(4, seed=9))
    out = tmp_path / "out"
    argv = ["ab", str(path), "--eval", str(eval_data), "--arms", "sft,weighted_x2", "--seeds", "0", "--out", str(out)]
    # planned for 2 processes (torchrun's own option): Axolotl's count over a batch of 2 x 4 rows, 2 steps
    launcher = ["--launcher", "torchrun -- --nproc_per_node=2"]
    assert sftkey([*argv[:-1], str(tmp_path / "planned"), *launcher, "--dry-run"]) == 0
    planned = json.loads((tmp_path / "planned" / "plan.json").read_text())
    assert planned["max_steps"] == 2
    assert planned["units"][0]["command"][1:] == [
        "train", str(tmp_path / "planned" / planned["units"][0]["config"]), "--launcher", "torchrun", "--",
        "--nproc_per_node=2",
    ]  # fmt: skip
    assert sftkey([*argv, "--launcher", "python", "--max-new-tokens", "16"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["framework"] == "axolotl" and plan["max_steps"] == STEPS
    for unit in plan["units"]:
        folder = out / unit["dir"]
        assert unit["command"][1:] == ["train", str(out / unit["config"]), "--launcher", "python"]
        ran = yaml.safe_load((folder / "config.yaml").read_text())
        assert ("plugins" in ran) == (unit["arm"] == "weighted_x2")
        card = (folder / "model" / "README.md").read_text()
        assert yaml.safe_load(card.split("```yaml\n")[1].split("```")[0]) == ran  # the YAML Axolotl trained
        args = torch.load(next(folder.glob("model/checkpoint-*/training_args.bin")), weights_only=False)
        assert (args.seed, args.max_steps) == (unit["seed"], STEPS)
        trained = json.loads((folder / "trained.json").read_text())
        assert trained["steps"] == STEPS
        assert any("sftkey/key_weight" in entry for entry in trained["log_history"]) == (unit["arm"] != "sft")
        assert (folder / "model" / "adapter_config.json").exists()
        assert json.loads((folder / "eval.summary.json").read_text())["examples"] == 4


def test_a_launcher_runs_the_module_form_and_counts_its_processes(trl_setup, tmp_path):
    """`accelerate launch ... --num_processes 2`: each unit's command is the launcher's `-m` form, and the epoch is
    counted over 2 processes (12 rows / (4 x 2) per step: 2 steps)."""
    out = tmp_path / "out"
    launcher = "accelerate launch --config_file fsdp.yaml --num_processes 2"
    assert sftkey(_ab_args(trl_setup, out, "--dry-run", "--launcher", launcher)) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["max_steps"] == 2 and plan["launcher"] == launcher.split()
    for unit in plan["units"]:
        config = out / unit["config"]
        assert unit["command"] == [*launcher.split(), "-m", "sftkey_plugin.cli.train", "--config", str(config)]
        assert yaml.safe_load(config.read_text())["max_steps"] == 2


def test_plain_sft_weighs_the_data_as_the_sftkey_arms_do(trl_setup, tmp_path):
    """Weights from the data (a data-weight key, or `weight` on the data's messages) reach every arm: plain SFT then
    trains through SFTKey's loss at key = other = 1 instead of stock SFT, which would leave them out of the
    baseline; without them plain SFT stays stock."""

    def sft_unit(config: Path, out: Path) -> dict:
        assert sftkey(["ab", str(config), *_ab_args(trl_setup, out, "--dry-run", seeds="0")[2:]]) == 0
        plan = json.loads((out / "plan.json").read_text())
        unit = yaml.safe_load((out / "runs/sft-seed0/config.yaml").read_text())
        return {"data_weights": plan["data_weights"], **unit}

    plain = sft_unit(trl_setup["config"], tmp_path / "plain")
    assert plain["sftkey"] is False and plain["data_weights"] is None
    keyed = _write_yaml(tmp_path / "wit.yaml", {**trl_setup["keys"], "sftkey_prompt_weight": 0.1})
    weighted_records = arithmetic_records(12, seed=3)
    weighted_records[0]["messages"][1]["weight"] = 2.0
    data = _write_jsonl(tmp_path / "weighted.jsonl", weighted_records)
    in_data = _write_yaml(tmp_path / "in_data.yaml", {**trl_setup["keys"], "dataset_name": str(data)})
    for config, source in ((keyed, "wit.yaml sets sftkey_prompt_weight"), (in_data, "weighted.jsonl has 'weight'")):
        unit = sft_unit(config, tmp_path / config.stem)
        assert source in unit["data_weights"]
        assert unit["sftkey"] is True and unit["sftkey_mode"] == "weighted"
        assert unit["sftkey_key_weight"] == unit["sftkey_other_weight"] == 1.0
