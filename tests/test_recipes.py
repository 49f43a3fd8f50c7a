"""recipes/: every Axolotl recipe loads through Axolotl's own ``load_cfg`` with the plugin, every TRL recipe parses
into ``SFTKeyConfig`` through ``TrlParser``; no recipe names a key the tools drop or change; the three arms of each
comparison differ only in the arm's keys; the documented data step works; one recipe of each framework trains."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# run in every test environment, on its trl (the Axolotl stacks pin 1.9 and 1.14.1): scripts/test.sh
pytestmark = pytest.mark.stack

yaml = pytest.importorskip("yaml")
pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
HAS_AXOLOTL = importlib.util.find_spec("axolotl") is not None
requires_axolotl = pytest.mark.skipif(not HAS_AXOLOTL, reason="axolotl is not installed in this environment")
PLUGIN = "sftkey_plugin.axolotl.SFTKeyPlugin"
STRATEGY = "sftkey_plugin.axolotl.strategy"


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


generate = _load_module("recipes_generate", RECIPES / "generate.py")
prepare = _load_module("recipes_prepare", RECIPES / "data" / "prepare.py")
train_script = _load_module("recipes_trl_train", RECIPES / "trl" / "train.py")

AXOLOTL_FILES = sorted((RECIPES / "axolotl").glob("*/*.yaml"))
TRL_FILES = sorted(p for p in (RECIPES / "trl").glob("*/*.yaml") if p.parent.name != "accelerate")
ARM_SUFFIXES = {"_sftkey.yaml": "sftkey", "_sft.yaml": "sft", "_sft-equal-compute.yaml": "sft-equal-compute"}


def _ids(paths):
    return [str(p.relative_to(RECIPES)) for p in paths]


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _arm(path: Path) -> tuple[str, str]:
    for suffix, arm in ARM_SUFFIXES.items():
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)], arm
    raise AssertionError(f"{path.name}: not named *_sftkey.yaml, *_sft.yaml or *_sft-equal-compute.yaml")


# ---- the files themselves -----------------------------------------------------------------------------------------


def test_recipes_match_the_generator():
    """The YAMLs and the README table are what ``recipes/generate.py`` writes (run it after editing its tables)."""
    stale = [
        str(path.relative_to(ROOT))
        for path, text in generate.expected_files().items()
        if not path.exists() or path.read_text(encoding="utf-8") != text
    ]
    assert not stale, f"run `python recipes/generate.py`: {stale}"
    written = {path for path in generate.expected_files() if path.suffix == ".yaml"}
    assert set(AXOLOTL_FILES) | set(TRL_FILES) == written, "a recipe YAML that the generator does not know"


def test_every_recipe_has_both_twins_differing_only_in_the_arm_keys():
    arm_keys = {
        "sftkey_mode",
        "sftkey_stage2_epoch",
        "sftkey_key_weight",
        "sftkey_other_weight",
        "num_epochs",
        "num_train_epochs",
        "warmup_ratio",
        "warmup_steps",
        "output_dir",
    }
    groups: dict[tuple[Path, str], dict[str, dict]] = {}
    for path in AXOLOTL_FILES + TRL_FILES:
        stem, arm = _arm(path)
        groups.setdefault((path.parent, stem), {})[arm] = _yaml(path)
    assert len(groups) == 14
    for (folder, stem), arms in groups.items():
        assert set(arms) == set(ARM_SUFFIXES.values()), f"{folder / stem}: missing twin"
        key, sft, equal = arms["sftkey"], arms["sft"], arms["sft-equal-compute"]
        for twin in (sft, equal):
            differing = {k for k in set(key) | set(twin) if key.get(k) != twin.get(k)}
            assert differing <= arm_keys, f"{folder / stem}: twins also differ in {differing - arm_keys}"
            assert twin["sftkey_mode"] == "weighted"
            assert twin["sftkey_key_weight"] == twin["sftkey_other_weight"] == 1.0  # plain SFT exactly
            assert "sftkey_stage2_epoch" not in twin
        epochs = "num_epochs" if "num_epochs" in key else "num_train_epochs"
        warmup = "warmup_ratio" if "warmup_ratio" in key else "warmup_steps"
        assert key["sftkey_mode"] == "two_stage" and key["sftkey_stage2_epoch"] == sft[epochs] == 3
        assert key[epochs] == equal[epochs] == 4  # equal compute: as many steps as stage 1 + stage 2
        for arm in (key, sft, equal):
            assert arm[warmup] * arm[epochs] == pytest.approx(0.5, abs=1e-5)  # paper: 0.5 epoch of warm-up
            assert arm["learning_rate"] == (5e-6 if arm.get("adapter") is None and not arm.get("use_peft") else 1e-4)
            assert arm["weight_decay"] == 0.1 and arm["bf16"] is True
        assert len({arm["output_dir"] for arm in arms.values()}) == 3


def test_recipes_cover_the_paper_grid():
    models, datasets, setups = set(), set(), set()
    for path in AXOLOTL_FILES:
        config = _yaml(path)
        models.add(config["base_model"])
        datasets.add(path.parent.name)
        setups.add(config.get("adapter") or ("fsdp" if "fsdp_config" in config else "zero3"))
    assert models == {model.hub for model in generate.MODELS.values()}
    assert datasets == set(generate.DATASETS) and setups == {"fsdp", "zero3", "lora", "qlora"}
    trl_datasets = {path.parent.name for path in TRL_FILES}
    assert trl_datasets == set(generate.DATASETS)


def test_deepspeed_and_accelerate_configs():
    zero3 = json.loads((RECIPES / "axolotl" / "deepspeed" / "zero3_bf16.json").read_text())
    assert zero3["zero_optimization"]["stage"] == 3 and zero3["bf16"]["enabled"] is True
    assert zero3["gradient_accumulation_steps"] == zero3["train_micro_batch_size_per_gpu"] == "auto"
    from accelerate.commands.config.config_args import load_config_from_file

    cluster = load_config_from_file(str(RECIPES / "trl" / "accelerate" / "fsdp2_8gpu.yaml"))  # unknown keys raise
    assert str(cluster.distributed_type).endswith("FSDP") and cluster.num_processes == 8
    assert cluster.fsdp_config["fsdp_version"] == 2 and cluster.mixed_precision == "bf16"


# ---- the data step ------------------------------------------------------------------------------------------------

SOURCE_ROWS = {  # the shapes of the hub datasets' rows
    "gsm8k": [
        {
            "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
            "May. How many clips did Natalia sell altogether in April and May?",
            "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
            "altogether in April and May.\n#### 72",
        }
    ],
    "openr1_math": [
        {
            "problem": "Solve $2x + 3 = 11$.",
            "solution": "Subtract 3: $2x = 8$. Divide by 2: $x = \\boxed{4}$.",
            "answer": "4",
            "problem_type": "Algebra",
        }
    ],
    "openbookqa": [
        {
            "id": "7-980",
            "question_stem": "The sun is responsible for",
            "choices": {
                "text": [
                    "puppies learning new tricks",
                    "children growing up and getting old",
                    "flowers wilting in a vase",
                    "plants sprouting, blooming and wilting",
                ],
                "label": ["A", "B", "C", "D"],
            },
            "answerKey": "D",
            "fact1": "the sun is the source of energy for physical cycles on Earth",
        }
    ],
    "cot_collection": [
        {
            "source": "Is the following sentence plausible? 'Joao Moutinho caught the screen pass.' Options: yes, no",
            "target": "no",
            "rationale": "Joao Moutinho is a soccer player. A screen pass is part of American football.",
            "task": "bigbench_sports",
            "type": "CoT",
        }
    ],
}


def _documented_commands(dataset: str) -> tuple[list[str], list[str] | None]:
    """The prepare and convert command lines of the data step as the recipes and README document them."""
    steps = [shlex.split(step) for step in generate.DATASETS[dataset].steps]
    prepare_argv = next(step for step in steps if step[:2] == ["python", "recipes/data/prepare.py"])[2:]
    convert_argv = next((step for step in steps if step[:2] == ["sftkey", "convert"]), None)
    return prepare_argv, convert_argv[1:] if convert_argv else None


def _run_data_step(dataset: str, rows: list[dict], folder: Path) -> tuple[Path, Path]:
    """Run the documented data step on local rows (``--input`` instead of the hub); returns (raw, tagged)."""
    from sftkey_plugin.cli.main import main as sftkey_main

    source = folder / f"{dataset}_source.json"
    source.write_text(json.dumps({str(i): row for i, row in enumerate(rows)}))  # CoT-Collection's {id: record}
    prepare_argv, convert_argv = _documented_commands(dataset)
    documented_raw = prepare_argv[1]
    raw = folder / f"{dataset}_raw.jsonl"
    options = [a for a in prepare_argv[2:] if a not in ("--input",) and not a.endswith(".json")]
    if "--sample" in options:
        options[options.index("--sample") + 1] = str(len(rows))
    assert prepare.main([prepare_argv[0], str(raw), "--input", str(source), *options]) == 0
    tagged = folder / f"{dataset}_tagged.jsonl"
    assert convert_argv[1] == documented_raw
    argv = [convert_argv[0], str(raw), str(tagged), *convert_argv[3:]]
    assert sftkey_main(argv) == 0
    return raw, tagged


@pytest.mark.parametrize("dataset", sorted(SOURCE_ROWS))
def test_documented_data_step(dataset, tmp_path):
    """prepare.py then ``sftkey convert`` exactly as documented: the paper's format, the answer as the key; the raw
    file's finder (the finder-only route) finds the same answer."""
    pytest.importorskip("sftkey_plugin.cli.main")
    from sftkey_plugin.cli.answers import answers_match, format_ok, strip_markers
    from sftkey_plugin.finders import match_key_spans

    raw, tagged = _run_data_step(dataset, SOURCE_ROWS[dataset], tmp_path)
    raw_records = [json.loads(line) for line in raw.read_text().splitlines()]
    tagged_records = [json.loads(line) for line in tagged.read_text().splitlines()]
    assert len(raw_records) == len(tagged_records) == len(SOURCE_ROWS[dataset])
    for raw_record, record in zip(raw_records, tagged_records):
        response = record["messages"][-1]["content"]
        assert format_ok(response), response
        name, spans = match_key_spans(response, "tags", record, {})
        assert name == "tags" and answers_match(strip_markers(response[spans[-1][0] :]), record["answer"])
        assert "<<" not in response  # GSM8K's calculator annotations are removed
        finder = generate.DATASETS[dataset].finder
        if finder:
            text = raw_record["messages"][-1]["content"]
            name, spans = match_key_spans(text, finder, raw_record, {})
            assert spans, f"{finder} finds no key in the raw {dataset} record"
            assert answers_match(strip_markers(text[spans[-1][0] : spans[-1][1]]), raw_record["answer"])


# ---- TRL ----------------------------------------------------------------------------------------------------------


def _parse_trl(path: Path, extra: list[str] = ()):
    return train_script.make_parser().parse_args_and_config(["--config", str(path), *extra])


@pytest.mark.parametrize("path", TRL_FILES, ids=_ids(TRL_FILES))
def test_trl_recipe_parses_into_sftkey_config(path, monkeypatch):
    import transformers.training_args
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

    from sftkey_plugin import SFTKeyConfig

    parser = train_script.make_parser()
    assert tuple(parser.dataclass_types) == (ScriptArguments, SFTKeyConfig, ModelConfig, DatasetMixtureConfig)
    # the recipes target GPUs: TrainingArguments refuses bf16 on a machine without one
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    parsed = _parse_trl(path)
    assert isinstance(parsed[1], SFTKeyConfig) and parsed[1].sftkey is True
    owners = {
        field.name: index for index, cls in enumerate(parser.dataclass_types) for field in dataclasses.fields(cls)
    }
    config = _yaml(path)
    unknown = [key for key in config if key not in owners]
    assert not unknown, f"keys TrlParser would refuse: {unknown}"
    for key, value in config.items():  # nothing is dropped or changed on the way (enums compare equal to strings)
        assert getattr(parsed[owners[key]], key) == value, key
    assert (ROOT / config["chat_template_path"]).is_file()
    assert config["dataset_name"].startswith(f"data/{path.parent.name}/")


# ---- Axolotl ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arch_dirs(tiny_dir, tmp_path_factory):
    """Config-only folders with the paper models' architectures (tiny sizes) and the tiny tokenizer, for
    ``load_cfg`` (it reads the model config: model type, architecture-dependent validators)."""
    from transformers import Qwen2Config, Qwen3Config, SmolLM3Config

    root = tmp_path_factory.mktemp("arch")
    sizes = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    folders = {}
    for name, cls in {"Qwen2": Qwen2Config, "Qwen3": Qwen3Config, "SmolLM3": SmolLM3Config}.items():
        folder = root / name
        shutil.copytree(
            tiny_dir, folder, ignore=shutil.ignore_patterns("*.safetensors", "config.json", "generation_config.json")
        )
        tokenizer = json.loads((folder / "tokenizer.json").read_text())
        cls(vocab_size=len(tokenizer["model"]["vocab"]) + len(tokenizer["added_tokens"]), **sizes).save_pretrained(
            folder
        )
        folders[name] = str(folder)
    return folders


def _arch(base_model: str) -> str:
    return "Qwen3" if "Qwen3" in base_model else "SmolLM3" if "SmolLM3" in base_model else "Qwen2"


@contextlib.contextmanager
def _restored_environment():
    """``load_cfg`` sets launch-time environment variables (ACCELERATE_*, FSDP_*): undo them for the other tests."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def load_recipe(arch_dirs, tmp_path_factory):
    """Load a recipe the way ``axolotl train`` does (``axolotl.cli.config.load_cfg``, plugins registered, validated,
    normalised), with the hub model replaced by a tiny one of the same architecture and the GPU capabilities of the
    recipe's hardware (8 or 1 A100). Only ZeRO-3's distributed start-up (``setup_deepspeed_env``: imports deepspeed,
    which is not installed here, and starts NCCL) is replaced, by a check of the stage it was given."""
    import axolotl.cli.config as cli_config
    import axolotl.utils.trainer as axolotl_trainer
    from axolotl.utils.dict import DictDefault

    out = tmp_path_factory.mktemp("axolotl_out")
    calls = []

    def load(path: Path, overrides: dict | None = None):
        raw = _yaml(path)
        config = {**copy.deepcopy(raw), "base_model": arch_dirs[_arch(raw["base_model"])], "output_dir": str(out)}
        config.update(overrides or {})
        gpus = 8 if ("fsdp_config" in raw or "deepspeed" in raw) else 1
        capabilities = {"bf16": True, "fp8": False, "tf32": False, "n_gpu": gpus, "compute_capability": "sm_80"}
        patches = pytest.MonkeyPatch()
        with _restored_environment(), patches.context() as patch:
            os.environ["WORLD_SIZE"] = str(gpus)  # as under `accelerate launch --num_processes 8`
            patch.chdir(ROOT)  # the recipes name recipes/axolotl/deepspeed/... relative to the repository root
            patch.setattr(cli_config, "gpu_capabilities", lambda: (capabilities, {"torch_version": "2.13.0"}))
            patch.setattr(axolotl_trainer, "setup_deepspeed_env", lambda cfg, stage=None: calls.append(stage))
            cfg = cli_config.load_cfg(DictDefault(config))
        return raw, cfg

    load.deepspeed_stages = calls
    return load


def _assert_same(key: str, value, loaded):
    if isinstance(value, dict):
        for sub, sub_value in value.items():
            _assert_same(f"{key}.{sub}", sub_value, loaded[sub])
    else:
        assert loaded == value, f"{key}: the recipe says {value!r}, Axolotl made it {loaded!r}"


@requires_axolotl
@pytest.mark.parametrize("path", AXOLOTL_FILES, ids=_ids(AXOLOTL_FILES))
def test_axolotl_recipe_loads_and_keeps_every_key(path, load_recipe):
    from axolotl.integrations.base import PluginManager

    from sftkey_plugin.axolotl.trainer import SFTKeyAxolotlTrainer

    raw, cfg = load_recipe(path)
    dropped = [key for key in raw if key not in cfg]
    assert not dropped, f"keys Axolotl dropped (unknown to it and to the plugin): {dropped}"
    for key, value in raw.items():
        assert value is not None, key
        if key in ("base_model", "output_dir"):
            continue
        if key == "dataset_prepared_path":
            assert str(cfg[key]).startswith(f"{value}/sftkey-")
        elif key == "datasets":
            for dataset, loaded in zip(value, cfg[key]):
                assert loaded["type"] == STRATEGY  # chat_template, rewritten by the plugin
                _assert_same(key, {k: v for k, v in dataset.items() if k != "type"}, loaded)
        elif key == "deepspeed":  # normalize_config reads the JSON file into the config
            assert cfg[key] == json.loads((ROOT / value).read_text()) and load_recipe.deepspeed_stages[-1] == 3
        else:
            _assert_same(key, value, cfg[key])
    gpus = 8 if ("fsdp_config" in raw or "deepspeed" in raw) else 1
    assert cfg.batch_size == 32 * gpus  # paper: 32 per device
    assert cfg.sftkey is True and PluginManager.get_instance().get_trainer_cls(cfg) is SFTKeyAxolotlTrainer


@requires_axolotl
def test_fsdp_recipes_wrap_the_models_decoder_layer(arch_dirs):
    from transformers import AutoConfig, AutoModelForCausalLM

    for path in AXOLOTL_FILES:
        raw = _yaml(path)
        if "fsdp_config" in raw:
            config = AutoConfig.from_pretrained(arch_dirs[_arch(raw["base_model"])])
            model = AutoModelForCausalLM.from_config(config)
            assert raw["fsdp_config"]["transformer_layer_cls_to_wrap"] in model._no_split_modules, path.name


# ---- one real run per framework, shrunk to the tiny model and a few local examples --------------------------------

# 8 examples, batch 4: 2 optimizer steps per epoch, so the recipe's 4 epochs are 8 steps and its stage 2 (the 4th
# epoch) is steps 7-8. (The run keeps num_epochs: with max_steps set, trainers count a single epoch.)
N_RECORDS = 8
STAGES = [1, 1, 1, 1, 1, 1, 2, 2]


def _gsm8k_rows(n: int) -> list[dict]:
    from sftkey_plugin.examples import arithmetic_problem

    rng = random.Random(3)
    rows = []
    for _ in range(n):
        question, reasoning, answer = arithmetic_problem(rng)
        rows.append({"question": question, "answer": f"{reasoning}\n#### {answer}"})
    return rows


def _obqa_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        row = copy.deepcopy(SOURCE_ROWS["openbookqa"][0])
        row["answerKey"] = "ABCD"[i % 4]
        rows.append(row)
    return rows


def _history(output_dir: Path) -> list[dict]:
    states = sorted(output_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    return json.loads(states[-1].read_text())["log_history"]


CPU_AXOLOTL = {  # what a CPU and a few examples need; everything else is the recipe's
    "micro_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "sequence_len": 256,
    "bf16": False,
    "val_set_size": 0,
    "logging_steps": 1,
    "dataloader_num_workers": 0,
    "dataloader_pin_memory": False,
    "lora_mlp_kernel": False,  # Triton kernels: GPU only
    "lora_qkv_kernel": False,
    "lora_o_kernel": False,
    "lora_embedding_kernel": False,
}


@requires_axolotl
def test_axolotl_recipe_trains_on_cpu(tiny_dir, tmp_path):
    """recipes/axolotl/gsm8k/qwen2.5-1.5b_lora_sftkey.yaml with the tiny model, data made by the documented data
    step, and 8 examples: ``axolotl train`` runs stage 1 for 3 epochs and stage 2 for the 4th, as the recipe says."""
    pytest.importorskip("sftkey_plugin.cli.main")
    _, tagged = _run_data_step("gsm8k", _gsm8k_rows(N_RECORDS), tmp_path)
    config = _yaml(RECIPES / "axolotl" / "gsm8k" / "qwen2.5-1.5b_lora_sftkey.yaml")
    config.update(copy.deepcopy(CPU_AXOLOTL))
    config.update(
        base_model=tiny_dir, dataset_prepared_path=str(tmp_path / "prepared"), output_dir=str(tmp_path / "out")
    )
    config["datasets"][0]["path"] = str(tagged)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "AXOLOTL_DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_DISABLED": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "axolotl.cli.train", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    logs = [entry for entry in _history(tmp_path / "out") if "loss" in entry]
    assert [entry["sftkey/stage"] for entry in logs] == STAGES
    assert all("sftkey/key_loss" in entry for entry in logs) and "sftkey/reasoning_loss" in logs[0]


def test_trl_recipe_trains_on_cpu(tiny_dir, tmp_path, monkeypatch):
    """recipes/trl/openbookqa/smollm3-3b-base_lora_sftkey.yaml through recipes/trl/train.py, which is `sftkey train`
    (LoRA, ChatML template file, assistant-only loss) with the tiny model and 8 examples made by the data step."""
    pytest.importorskip("sftkey_plugin.cli.main")
    _, tagged = _run_data_step("openbookqa", _obqa_rows(N_RECORDS), tmp_path)
    monkeypatch.chdir(ROOT)  # chat_template_path is relative to the repository root
    overrides = {
        "model_name_or_path": tiny_dir,
        "dataset_name": str(tagged),
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "bf16": "false",
        "dtype": "float32",
        "max_length": 256,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "dataset_num_proc": 1,
        "optim": "adamw_torch",
    }
    extra = [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
    recipe = RECIPES / "trl" / "openbookqa" / "smollm3-3b-base_lora_sftkey.yaml"
    assert train_script.main(["--config", str(recipe), *extra]) == 0
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())  # saved for `sftkey ab`
    logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["sftkey/stage"] for entry in logs] == STAGES
    assert all("sftkey/key_loss" in entry for entry in logs) and "sftkey/reasoning_loss" in logs[0]
    assert (tmp_path / "out" / "adapter_config.json").exists()
