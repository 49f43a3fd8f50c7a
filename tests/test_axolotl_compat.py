"""What differs between Axolotl 0.19 and 0.21, on both: plugin discovery through the ``axolotl.plugins`` entry point
(0.21 loads the plugin into every run, so with ``sftkey`` unset or false it must change nothing, bit for bit), the
plugin's import cost and dependencies, the rule for handing ``num_items_in_batch`` to the model, and ``use_dft``."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

import pytest
import torch

pytest.importorskip("axolotl")

from test_axolotl import (
    DISCOVERY,
    PLUGIN,
    _base_config,
    _config,
    _env,
    _write,
    axolotl_env,
    recorded_run,
    workdir,
)
from test_trl import GRAD_RTOL, assert_gradients_close, hand_step

pytestmark = pytest.mark.axolotl

__all__ = ["axolotl_env", "workdir"]  # the fixtures, used by name

TESTS = Path(__file__).resolve().parent


def test_plugin_is_discovered_exactly_where_axolotl_discovers():
    """The package's ``axolotl.plugins`` entry point names the plugin as users list it, and Axolotl 0.21 loads it
    without a ``plugins:`` list (0.19 has no such discovery: DISCOVERY tells the tests which form to write)."""
    from importlib.metadata import entry_points

    from axolotl.integrations import base

    from sftkey_plugin.axolotl.plugin import plugin_discovered

    points = {point.name: point.value for point in entry_points(group="axolotl.plugins")}
    assert points.get("sftkey") == "sftkey_plugin.axolotl:SFTKeyPlugin"
    assert hasattr(base, "get_builtin_plugins") == DISCOVERY == plugin_discovered()
    if DISCOVERY:
        assert PLUGIN in base.get_builtin_plugins() and PLUGIN in base.PluginManager.get_instance().plugins


def _quickstart_yaml() -> list[dict]:
    """The YAML blocks of the README's Axolotl quickstart, as written."""
    import yaml

    readme = (TESTS.parent / "README.md").read_text(encoding="utf-8")
    quickstart = readme.split("<!-- quickstart-axolotl:start -->")[1].split("<!-- quickstart-axolotl:end -->")[0]
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", quickstart, re.S)]


def test_readme_axolotl_quickstart_as_written(axolotl_env, workdir):
    """The README's quickstart: its config without ``plugins:`` is SFTKey on Axolotl 0.21 and plain Axolotl on 0.19
    (the keys dropped), and with the ``plugins:`` lines it shows for 0.19 it is SFTKey on both."""
    from axolotl.integrations.base import PluginManager

    from sftkey_plugin.axolotl.trainer import SFTKeyAxolotlTrainer

    alone, listing = _quickstart_yaml()
    assert "plugins" not in alone and listing == {"plugins": [PLUGIN], "sftkey": True}
    base = _config(workdir, "quickstart", {})  # the tiny model and the tests' run settings
    dataset = {**alone["datasets"][0], "path": workdir["data"], "ds_type": "json"}
    for written, sftkey in ((alone, DISCOVERY), ({**alone, **listing}, True)):
        cfg = axolotl_env({**base, **written, "datasets": [dataset]})
        enabled = PluginManager.get_instance().get_trainer_cls(cfg) is SFTKeyAxolotlTrainer
        assert enabled is sftkey and (cfg.sftkey_mode == "two_stage") is sftkey
        assert cfg.datasets[0].type == ("sftkey_plugin.axolotl.strategy" if sftkey else "chat_template")


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_strategy_type_without_sftkey_names_what_is_missing(axolotl_env, workdir):
    """A dataset typed ``sftkey_plugin.axolotl.strategy`` without ``sftkey: true`` is tokenised as plain
    ``chat_template``, with a warning that names the cause: where Axolotl loaded the plugin (0.21's entry point, or
    the ``plugins:`` list) it is ``sftkey``, on 0.19 without the list it is the list."""
    from test_axolotl import _strategy

    dataset = {"path": workdir["data"], "ds_type": "json", "type": "sftkey_plugin.axolotl.strategy"}
    handler, logger = _Messages(), logging.getLogger("sftkey_plugin")
    logger.addHandler(handler)
    try:
        _strategy(axolotl_env, _config(workdir, "strategy_off", {"datasets": [dataset]}))
    finally:
        logger.removeHandler(handler)
    expected = "sftkey is not true" if DISCOVERY else f"the plugin is not listed under plugins: (add {PLUGIN})"
    assert any(expected in message for message in handler.messages), handler.messages


LIGHT_IMPORT = """
import importlib, sys, time
import axolotl.integrations.base, axolotl.utils.config  # what Axolotl has imported when it discovers plugins
for name in ("trl", "math_verify", "matplotlib", "deepspeed", "sftkey_plugin.trl"):
    sys.modules.setdefault(name, None)  # optional dependencies Axolotl has not imported: importing one raises
before = set(sys.modules)
start = time.perf_counter()
plugin = importlib.import_module("sftkey_plugin.axolotl").SFTKeyPlugin()
importlib.import_module(plugin.get_input_args().rsplit(".", 1)[0])  # the config keys, read at validation
seconds = time.perf_counter() - start
print(sorted(set(sys.modules) - before))
print(seconds)
"""


def test_plugin_import_is_light_and_needs_no_optional_dependency():
    """Discovery imports the plugin into every Axolotl run, and 0.21 stops a run whose listed plugin fails to import:
    the plugin module and its config keys import only this package's core and pluggy (no trl, math-verify, plotting
    or DeepSpeed, nothing Axolotl has not loaded already), in a few milliseconds."""
    done = subprocess.run(
        [sys.executable, "-c", LIGHT_IMPORT], env=_env(), capture_output=True, text=True, timeout=300, check=True
    )
    modules_line, seconds_line = done.stdout.strip().splitlines()[-2:]
    modules = json.loads(modules_line.replace("'", '"'))
    print(f"\nimport sftkey_plugin.axolotl + its config keys after Axolotl's own: {float(seconds_line) * 1000:.0f} ms")
    assert "sftkey_plugin.axolotl.plugin" in modules and "sftkey_plugin.axolotl.args" in modules
    assert [m for m in modules if not m.startswith(("sftkey_plugin", "pluggy"))] == []
    # the trainer and its data path load only when sftkey is true
    assert not {"sftkey_plugin.axolotl.trainer", "sftkey_plugin.hf_trainer", "sftkey_plugin.tokenize"} & set(modules)


# ---- which models get num_items_in_batch -------------------------------------------------------------------------


def _loss_without_count(logits, labels, vocab_size, **kwargs):  # type: ignore[no-untyped-def]
    """A causal-LM loss that ignores ``num_items_in_batch`` (a mean per micro-batch), as some custom models have."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(logits, labels, vocab_size)


def _tokenised_rows(tokenizer, n: int) -> list[dict]:
    """``n`` copies of one tokenised chat with its key mask: every micro-batch then has the same mean loss."""
    from sftkey_plugin.examples import arithmetic_records
    from sftkey_plugin.tokenize import MarkingOptions, tokenize_with_key_mask

    record = arithmetic_records(1, seed=4, form="prompt_completion")[0]
    encoded = tokenize_with_key_mask(record, tokenizer, MarkingOptions())
    ids = encoded["input_ids"]
    labels = [t if trained else -100 for t, trained in zip(ids, encoded["completion_mask"])]
    row = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "sftkey_mask": encoded["sftkey_mask"]}
    return [dict(row) for _ in range(n)]


@pytest.mark.parametrize(
    ("loss_function", "peft", "takes_count"),
    [(None, False, True), (_loss_without_count, False, False), (None, True, True), (_loss_without_count, True, False)],
    ids=["causal_lm_loss", "loss_without_count", "peft_causal_lm_loss", "peft_loss_without_count"],
)
def test_num_items_in_batch_follows_the_models_loss_function(tiny_dir, tmp_path, loss_function, peft, takes_count):
    """Axolotl 0.21's rule (``model_loss_accepts_num_items_in_batch``, and its test): the count goes to the model only
    when its ``loss_function`` takes it. The plugin once restored transformers' rule (any ``**kwargs`` forward) over
    0.19's, which also handed the count to losses that ignore it: their micro-batch means were then summed, not
    averaged, over accumulated micro-batches. Checked by the flag and by the first logged loss of a real step of 2 x 2
    accumulated identical rows, which is the rows' mean NLL either way."""
    from axolotl.core.training_args import AxolotlTrainingArguments
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    from sftkey_plugin.axolotl.trainer import SFTKeyAxolotlTrainer
    from sftkey_plugin.config import SFTKeyArguments

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    rows = _tokenised_rows(tokenizer, 4)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        mean_nll = float(
            model(input_ids=torch.tensor([rows[0]["input_ids"]]), labels=torch.tensor([rows[0]["labels"]])).loss
        )
    if loss_function is not None:
        model.loss_function = loss_function
    if peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    args = AxolotlTrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1, learning_rate=0.0, optim="sgd",
        per_device_train_batch_size=2, gradient_accumulation_steps=2, logging_steps=1, save_strategy="no",
    )  # fmt: skip
    trainer = SFTKeyAxolotlTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer),
        sftkey_arguments=SFTKeyArguments(sftkey=True, sftkey_mode="weighted"),  # 1.0/1.0: the model's own loss
    )
    assert trainer.model_accepts_loss_kwargs is takes_count
    try:  # Axolotl 0.21's own rule
        from axolotl.core.trainers.base import model_loss_accepts_num_items_in_batch
    except ImportError:  # Axolotl 0.19
        pass
    else:
        assert model_loss_accepts_num_items_in_batch(trainer.accelerator.unwrap_model(trainer.model)) is takes_count
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged[0] == pytest.approx(mean_nll, rel=1e-5)


# ---- use_dft (Axolotl 0.21: compute_loss_func = Axolotl's dft_loss) ----------------------------------------------


@pytest.mark.skipif(not DISCOVERY, reason="use_dft is an Axolotl 0.21 key (0.19 drops it)")
def test_use_dft_weighs_the_dft_loss(workdir, tiny_dir):
    """``use_dft: true`` + ``weighted`` 3.0/0.5 through ``axolotl train``: the first step's loss and gradients are
    ``sum(w * p * NLL) / n``, DFT's per-token loss weighted (as on the TRL side with ``loss_type="dft"``), not DFT
    plus a plain-NLL correction; before, the run stopped (the trainer read the labels that DFT's loss path pops)."""
    overrides = {"use_dft": True, "sftkey_mode": "weighted", "sftkey_key_weight": 3.0, "sftkey_other_weight": 0.5}
    record = recorded_run(workdir, "dft_weighted", {**overrides, "max_steps": 1})
    rows = record["first_rows"]
    expected, expected_grads = hand_step(tiny_dir, rows, key_weight=3.0, other_weight=0.5, dft=True)
    assert record["logs"][0]["loss"] == pytest.approx(expected, rel=GRAD_RTOL)
    assert_gradients_close(record["grads"][0], expected_grads)
    for weights, dft in (((1.0, 1.0), True), ((3.0, 0.5), False)):  # the weights and DFT's factor both matter
        other, _ = hand_step(tiny_dir, rows, key_weight=weights[0], other_weight=weights[1], dft=dft)
        assert expected != pytest.approx(other, rel=1e-3)


# ---- discovered and off: bit-identical to the plugin not installed -----------------------------------------------


def _python_without_sftkey(root: Path) -> Path:
    """The interpreter of a virtual environment that is this one without this distribution (its metadata, with the
    entry points, and the editable-install hook): every other package of this site-packages is linked as it is."""
    target = root / "venv-without-sftkey"
    venv.create(target, with_pip=False, symlinks=True)
    paths = sysconfig.get_paths(vars={"base": str(target), "platbase": str(target)})
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if "sftkey_plugin" not in entry.name:
            (Path(paths["purelib"]) / entry.name).symlink_to(entry)
    return Path(paths["scripts"]) / "python"


@pytest.mark.skipif(not DISCOVERY, reason="Axolotl 0.19 loads only the plugins: list (test_axolotl.py's off tests)")
def test_discovered_plugin_off_is_bit_identical_to_not_installed(workdir, tiny_dir, tmp_path):
    """Axolotl 0.21 loads the plugin into every run of an environment where it is installed. With ``sftkey`` unset or
    false the run is the one without the package: the same config, trainer and collator classes, training arguments
    (``average_tokens_across_devices`` included), loss settings, callbacks, prepared-dataset hash and rows, and
    bit-identical losses (train and eval) and final weights. The configuration is deterministic (no packing; SGD;
    OLoRA's deterministic init; one thread): the three runs are themselves the evidence."""
    from safetensors.torch import load_file

    runs = {
        "not_installed": ({}, _python_without_sftkey(tmp_path)),
        "discovered_unset": ({}, Path(sys.executable)),
        "discovered_false": ({"sftkey": False}, Path(sys.executable)),
    }
    processes, started = {}, time.time()
    for name, (extra, python) in runs.items():
        run_dir = tmp_path / name
        run_dir.mkdir()
        config = _base_config(tiny_dir, workdir["data"], "prepared", "out")  # relative: the same text in each run
        config.update({"plugins": ["axolotl_facts.RunFacts"], "val_set_size": 0.125, "eval_strategy": "steps"})
        config.update({"eval_steps": 2, **extra})
        _write(run_dir / "config.yml", config)
        command = [str(python), "-m", "axolotl.cli.train", "config.yml"]
        env = {**_env(), "PYTHONPATH": str(TESTS)}
        log = (run_dir / "log.txt").open("w")
        processes[name] = subprocess.Popen(command, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds: dict[str, float] = {}  # until each run ends, all three started together on 2 cores
    while len(seconds) < len(processes) and time.time() - started < 600:
        for name, process in processes.items():
            if name not in seconds and process.poll() is not None:
                seconds[name] = time.time() - started
                assert process.returncode == 0, (tmp_path / name / "log.txt").read_text()[-4000:]
        time.sleep(0.5)
    assert len(seconds) == len(processes), f"timed out: {set(processes) - set(seconds)}"
    print(f"\nwall time, 3 runs started together on 2 cores: {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}")

    facts = {name: json.loads((tmp_path / name / "out" / "facts.json").read_text()) for name in runs}
    absent, *present = facts.values()
    assert PLUGIN not in absent["plugins"] and not absent["sftkey_importable"]
    assert all(PLUGIN in f["plugins"] and f["sftkey_importable"] for f in present)  # discovered, not listed
    assert "sftkey" not in absent["cfg"] and present[1]["cfg"].pop("sftkey") is False
    for other in present:
        for key in set(absent) - {"plugins", "sftkey_importable"}:
            assert other[key] == absent[key], key
    assert absent["average_tokens_across_devices"] is False  # Axolotl's own setting, which SFTKey on changes
    assert absent["trainer"] == "axolotl.core.trainers.base.AxolotlTrainer"
    losses = [entry["loss"] for entry in absent["log_history"] if "loss" in entry]
    assert len(losses) == 4 and len(set(losses)) == 4 and any("eval_loss" in e for e in absent["log_history"])

    prepared = [sorted(p.name for p in (tmp_path / name / "prepared").iterdir()) for name in runs]
    assert prepared[0] and prepared[0] == prepared[1] == prepared[2]  # the dataset hash
    weights = [load_file(tmp_path / name / "out" / "adapter_model.safetensors") for name in runs]
    assert weights[0].keys() == weights[1].keys() == weights[2].keys() and weights[0]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]) and torch.equal(weights[0][name], weights[2][name])
