"""``sftkey ab``: an equal-compute A/B of SFTKey arms over seeds, on the user's own TRL or Axolotl config and eval set.

The plan writes one runnable config per (arm, seed) under ``OUT/runs/`` (the user's config with only the arm's
``sftkey_*`` keys, ``seed``, ``data_seed``, ``output_dir`` and ``max_steps`` changed) and the command that trains
it; the run trains the units one after another as subprocesses, evaluates each trained model with ``sftkey eval``
and writes the report. Every file of a unit says how far it got, so rerunning the same command continues where a
run stopped. The folder layout is the interface with the report (``ab_report``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .data import CLIError, load_records
from .demo import ARM_LABELS, DEMO_ARMS, EQUAL_COMPUTE, arm_settings

PLAN_VERSION = 1
AXOLOTL_PLUGIN = "sftkey_plugin.axolotl.SFTKeyPlugin"
TRL_TRAIN_MODULE = "sftkey_plugin.cli.train"
# the keys that tell the two config dialects apart
# the keys that tell the two config dialects apart (both may name `datasets`: TRL's mixtures)
FRAMEWORK_KEYS = {"trl": ("model_name_or_path",), "axolotl": ("base_model",)}
PLAIN_SFT = {"sftkey": False}
# plain SFT through SFTKey's loss: the data's weights apply, key and other tokens weigh the same
PLAIN_SFT_WITH_DATA_WEIGHTS = {"sftkey": True, "sftkey_mode": "weighted", "sftkey_key_weight": 1.0,
                               "sftkey_other_weight": 1.0}  # fmt: skip
DATA_WEIGHT_KEYS = ("sftkey_message_weight_field", "sftkey_example_weight_field", "sftkey_prompt_weight")
# a step count for the demo's arm table, whose sftkey_* settings do not depend on it
_PROBE_STEPS = 1000
# the launcher options that give the number of training processes (accelerate, torchrun)
PROCESS_OPTIONS = ("--num_processes", "--num-processes", "--nproc_per_node", "--nproc-per-node")
EVAL_DEFAULTS = {"answer_field": "answer", "finder": "auto", "max_new_tokens": 512, "batch_size": 16}
TAIL_CHARS = 4000
POLL_SECONDS = 2.0


def add_parser(subparsers: Any) -> None:
    """Register ``ab`` and its options."""
    parser = subparsers.add_parser(
        "ab",
        help="does SFTKey help on my model? an equal-compute A/B over seeds on your own config and eval set",
        description="Train every arm once per seed from CONFIG (a TRL config as `sftkey train` reads it, or an "
        "Axolotl config), each for the same number of optimizer steps, evaluate each trained model on EVAL with "
        "`sftkey eval` and report each arm against the first. `sftkey ab report OUT` writes the report of a "
        "finished (or cluster-run) folder.",
        epilog="Built-in arms: sft (plain SFT, also sft_equal); "
        + "; ".join(f"{name}: {ARM_LABELS[name]}" for name in EQUAL_COMPUTE if name != "sft_equal")
        + ". --arms-file adds arms: a YAML mapping {name: {sftkey_* key: value}}.",
    )
    parser.add_argument("config", metavar="CONFIG", help="the TRL or Axolotl YAML (or 'report', then OUT)")
    parser.add_argument("report_out", nargs="?", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--eval", dest="eval_data", metavar="EVAL", help="records with gold answers")
    parser.add_argument("--arms", default=DEMO_ARMS, help=f"comma-separated, the first is the baseline ({DEMO_ARMS})")
    parser.add_argument("--arms-file", help="YAML {arm name: {sftkey_* overrides}} of your own arms")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--out", help="the output folder (plan, one folder per unit, report)")
    parser.add_argument(
        "--stage2-ratio",
        type=float,
        default=0.5,
        help="where the built-in arms' stage 2, soft stage 2 and ramp start, as a share of the steps (default 0.5)",
    )
    parser.add_argument(
        "--launcher",
        default="",
        help="TRL: the command that starts training, e.g. 'accelerate launch --config_file fsdp.yaml' (runs the "
        "module form); Axolotl: what follows `axolotl train CONFIG --launcher`, e.g. 'torchrun -- --nproc_per_node=2'",
    )
    parser.add_argument(
        "--processes",
        type=int,
        help="training processes, for the step count of an epoch-based config (default: read from --launcher's "
        "--num_processes/--nproc_per_node, else 1)",
    )
    parser.add_argument("--answer-field", default=EVAL_DEFAULTS["answer_field"], help="EVAL's gold answer field")
    parser.add_argument("--finder", default=EVAL_DEFAULTS["finder"], help="sftkey eval's answer finder")
    parser.add_argument("--max-new-tokens", type=int, default=EVAL_DEFAULTS["max_new_tokens"])
    parser.add_argument("--eval-batch-size", type=int, default=EVAL_DEFAULTS["batch_size"])
    parser.add_argument("--learnt", type=float, help="accuracy above which a seed counts as having learnt the task")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="units trained (and evaluated) side by side (default 1: one after another); on a CPU, with --threads",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads of each unit's training and evaluation (OMP_NUM_THREADS, MKL_NUM_THREADS; default: "
        "the environment's)",
    )
    parser.add_argument("--dry-run", action="store_true", help="write the plan and print the commands; train nothing")
    parser.set_defaults(func=run)


# ---------------------------------------------------------------- arms


def builtin_arm(name: str, ratio: float) -> dict[str, Any] | None:
    """A built-in arm's overrides (``sft`` is plain SFT), None for a name the demo does not know as equal compute."""
    if name == "sft":
        return dict(PLAIN_SFT)
    if name not in EQUAL_COMPUTE:
        return None
    settings = arm_settings(name, _PROBE_STEPS, ratio).sftkey
    return dict(PLAIN_SFT) if settings is None else {"sftkey": True, **settings}


def read_arms_file(path: str) -> dict[str, dict[str, Any]]:
    """``{name: {sftkey_* overrides}}`` from a YAML file; ``sftkey: true`` unless the arm says otherwise."""
    data = _read_yaml(path)
    arms = {}
    for name, overrides in data.items():
        overrides = overrides or {}
        if not isinstance(overrides, dict) or not all(str(key).startswith("sftkey") for key in overrides):
            raise CLIError(f"{path}: arm {name!r} must map sftkey_* keys to values")
        arms[str(name)] = {"sftkey": True, **overrides}
    return arms


def resolve_arms(names: str, arms_file: str | None, ratio: float) -> dict[str, dict[str, Any]]:
    """The chosen arms' overrides in the order given (the first is the baseline); unknown names are refused."""
    custom = read_arms_file(arms_file) if arms_file else {}
    chosen = [name.strip() for name in names.split(",") if name.strip()]
    if not chosen or len(set(chosen)) < len(chosen):
        raise CLIError(f"--arms {names!r}: give distinct arm names")
    arms = {}
    for name in chosen:
        overrides = custom.get(name) or builtin_arm(name, ratio)
        if overrides is None:
            known = ["sft", *EQUAL_COMPUTE, *custom]
            reason = " (it changes the steps or the learning rate: not equal compute)" if name in ARM_LABELS else ""
            raise CLIError(f"unknown arm {name!r}{reason}; known: {', '.join(known)}")
        arms[name] = overrides
    return arms


def local_training_data(config: Mapping[str, Any]) -> list[str]:
    """The config's training data that is on this machine: TRL's ``dataset_name``, any ``datasets[].path``."""
    entries = [entry for entry in config.get("datasets") or [] if isinstance(entry, Mapping)]
    names = [config.get("dataset_name"), *(entry.get("path") for entry in entries)]
    return [str(name) for name in names if name and Path(str(name)).exists()]


def data_weights_source(config: Mapping[str, Any], config_path: Path) -> str | None:
    """What gives the units weights from the data (a data-weight key of the config, or the message weight field in
    its local training data), None when nothing does: stock SFT would leave them out of the baseline."""
    keys = [key for key in DATA_WEIGHT_KEYS if config.get(key)]
    if keys:
        return f"{config_path.name} sets {', '.join(keys)}"
    from datasets import load_dataset

    from ..weights import DEFAULT_MESSAGE_FIELD, features_hold
    from .train import LOCAL_FORMATS

    for path in local_training_data(config):
        suffix = Path(path).suffix.lower()
        data = load_dataset(LOCAL_FORMATS[suffix], data_files=path) if suffix in LOCAL_FORMATS else load_dataset(path)
        if any(features_hold(split.features, DEFAULT_MESSAGE_FIELD) for split in data.values()):
            return f"{path} has '{DEFAULT_MESSAGE_FIELD}' fields"
    return None


def with_data_weights(arms: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The arms with plain SFT trained through SFTKey's loss at key = other = 1, so that it weighs the data as the
    SFTKey arms do and the comparison is of the key weighting alone."""
    return {name: dict(PLAIN_SFT_WITH_DATA_WEIGHTS) if o == PLAIN_SFT else o for name, o in arms.items()}


def overridden_keys(config: Mapping[str, Any], arms: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The config's keys that some arm sets: the arm would silently replace the user's value."""
    return sorted({key for overrides in arms.values() for key in overrides} & set(config))


# ---------------------------------------------------------------- config, framework, steps


def _read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise CLIError(f"{path}: no such file") from error
    except yaml.YAMLError as error:
        raise CLIError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(data, dict):
        raise CLIError(f"{path}: expected a YAML mapping")
    return data


def _write_yaml(path: Path, data: Mapping[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False), encoding="utf-8")
    return path


def detect_framework(config: Mapping[str, Any], path: str) -> str:
    """``trl`` or ``axolotl``, from the keys only one of them uses."""
    found = [name for name, keys in FRAMEWORK_KEYS.items() if any(key in config for key in keys)]
    if len(found) != 1:
        expected = " or ".join("/".join(keys) for keys in FRAMEWORK_KEYS.values())
        raise CLIError(f"{path}: cannot tell TRL from Axolotl (expected {expected})")
    return found[0]


def processes_of(launcher: Sequence[str], given: int | None) -> int:
    """Training processes: ``--processes``, else the launcher's own option, else 1."""
    if given:
        return given
    for index, word in enumerate(launcher):
        name, _, value = word.partition("=")
        if name in PROCESS_OPTIONS:
            value = value or (launcher[index + 1] if index + 1 < len(launcher) else "")
            if value.isdigit():
                return int(value)
    return 1


def trl_epoch_steps(parsed: Sequence[Any], processes: int) -> int:
    """The optimizer steps transformers' Trainer runs for an epoch-based TRL config (its set_initial_training_values:
    batches per process, accumulated, rounded up), from the rows ``sftkey train`` loads."""
    from .train import load_data

    script_args, training_args, _, dataset_args = parsed
    if training_args.packing:
        raise CLIError("a TRL config with packing that counts epochs: set max_steps (packing changes the rows)")
    rows = len(load_data(script_args, dataset_args)[script_args.dataset_train_split])
    per_step = training_args.per_device_train_batch_size * processes
    batches = rows // per_step if training_args.dataloader_drop_last else math.ceil(rows / per_step)
    per_epoch = max(math.ceil(batches / training_args.gradient_accumulation_steps), 1)
    return math.ceil(training_args.num_train_epochs * per_epoch)


def framework_check(framework: str, path: Path, label: str) -> Any:
    """The framework's own reading of a config, which refuses what it would refuse at training: TRL's parser as
    ``sftkey train`` builds it (the parsed dataclasses), or Axolotl's validation (its ``cfg``)."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            if framework == "trl":
                from .train import parse

                return parse(["--config", str(path)])
            from axolotl.cli.config import load_cfg

            return load_cfg(str(path))
    except SystemExit as error:  # argparse prints why, then exits
        lines = [line for line in captured.getvalue().splitlines() if line.strip()]
        raise CLIError(f"{framework} rejects {label}: {lines[-1] if lines else error}") from None
    except Exception as error:  # pydantic's and the dataclasses' own errors
        raise CLIError(f"{framework} rejects {label}: {error}") from error


def axolotl_steps(cfg: Any, processes: int) -> int:
    """Axolotl's own step count: the ``total_num_steps`` it computes from the prepared data (packing bins included)
    and passes to the Trainer as ``max_steps``."""
    from axolotl.common.datasets import load_datasets

    # the batch size of several processes, as Axolotl's normalisation makes it from WORLD_SIZE (setting that here
    # would make Axolotl wait for the other processes of a distributed run)
    cfg.batch_size *= max(processes // (cfg.context_parallel_size or 1) // (cfg.tensor_parallel_size or 1), 1)
    steps = load_datasets(cfg=cfg).total_num_steps
    if not steps:
        raise CLIError("Axolotl counts no training steps for this config")
    return int(steps)


# ---------------------------------------------------------------- plan


def sha256(path: str | Path) -> str:
    """Hex digest of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def unit_config(
    base: Mapping[str, Any], framework: str, overrides: Mapping[str, Any], seed: int, output_dir: Path, steps: int
) -> dict[str, Any]:
    """The user's config with only the arm's keys, the seeds, ``output_dir`` and ``max_steps`` changed (and, on
    Axolotl, the plugin listed where the arm turns SFTKey on: Axolotl 0.19 loads only listed plugins)."""
    config = copy.deepcopy(dict(base))
    config.update(copy.deepcopy(dict(overrides)))
    config["seed"] = seed
    if framework == "trl" or "data_seed" in config:  # Axolotl has no data_seed: its data order follows seed
        config["data_seed"] = seed
    config["output_dir"] = str(output_dir)
    config["max_steps"] = steps
    if framework == "axolotl" and overrides.get("sftkey"):
        plugins = list(config.get("plugins") or [])
        config["plugins"] = plugins if AXOLOTL_PLUGIN in plugins else [*plugins, AXOLOTL_PLUGIN]
    return config


def unit_command(framework: str, launcher: Sequence[str], config_path: Path) -> list[str]:
    """The argv that trains one unit."""
    if framework == "trl":
        start = [*launcher] if launcher else [sys.executable]
        return [*start, "-m", TRL_TRAIN_MODULE, "--config", str(config_path)]
    axolotl = Path(sys.executable).with_name("axolotl")
    command = [str(axolotl) if axolotl.exists() else "axolotl", "train", str(config_path)]
    return [*command, "--launcher", *launcher] if launcher else command


def check_eval_data(path: str, answer_field: str, finder: str) -> None:
    """Every eval record needs a gold answer (its answer field, or one found in its reference response)."""
    from .evaluate import gold_answer

    records = load_records(path)
    if not records:
        raise CLIError(f"{path}: no records")
    missing = [i for i, record in enumerate(records) if gold_answer(record, answer_field, finder) is None]
    if missing:
        raise CLIError(
            f"{path}: {len(missing)} of {len(records)} records have no gold answer (no {answer_field!r} field and "
            f"no answer in a reference response; first: record {missing[0]}); use --answer-field"
        )


def build_plan(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The plan and each unit's config, after every check that can fail before training."""
    if not (args.eval_data and args.out):
        raise CLIError("give CONFIG, --eval EVAL.jsonl and --out OUT")
    config_path, eval_path, out = Path(args.config).resolve(), Path(args.eval_data).resolve(), Path(args.out).resolve()
    base = _read_yaml(config_path)
    framework = detect_framework(base, str(config_path))
    if framework == "axolotl" and str(base.get("save_strategy")).lower() == "no":
        raise CLIError(
            f"{config_path}: save_strategy: no leaves no trainer_state.json (Axolotl writes it with its checkpoints), "
            "and ab reads each unit's steps and losses from it: save at least at the end (remove the key)"
        )
    arms = resolve_arms(args.arms, args.arms_file, args.stage2_ratio)
    data_weights = data_weights_source(base, config_path)
    if data_weights:
        arms = with_data_weights(arms)
    clashing = overridden_keys(base, arms)
    if clashing:
        raise CLIError(f"{config_path} already sets {', '.join(clashing)}, which the arms set: remove them from it")
    try:
        seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    except ValueError as error:
        raise CLIError(f"--seeds {args.seeds!r}: give comma-separated integers") from error
    if not seeds or len(set(seeds)) < len(seeds):
        raise CLIError(f"--seeds {args.seeds!r}: give distinct seeds")
    eval_options = {
        "answer_field": args.answer_field,
        "finder": args.finder,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.eval_batch_size,
    }
    check_eval_data(str(eval_path), args.answer_field, args.finder)
    launcher = shlex.split(args.launcher)
    processes = processes_of(launcher, args.processes)
    units, configs = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        steps = _planned_steps(
            base, framework, arms, seeds[0], processes, Path(scratch), f"{config_path.name} as the baseline arm"
        )
        for seed in seeds:  # seed-major: each seed's arms are comparable as soon as they finish
            for arm, overrides in arms.items():
                name, folder = f"{arm}-seed{seed}", f"runs/{arm}-seed{seed}"
                configs[name] = unit_config(base, framework, overrides, seed, out / folder / "model", steps)
                command = unit_command(framework, launcher, out / folder / "config.yaml")
                units.append(
                    {"name": name, "arm": arm, "seed": seed, "dir": folder, "config": f"{folder}/config.yaml",
                     "command": command}
                )  # fmt: skip
        for arm in arms:  # the framework's verdict on each arm's config, before anything is written to OUT
            path = _write_yaml(Path(scratch) / f"{arm}.yaml", configs[f"{arm}-seed{seeds[0]}"])
            framework_check(framework, path, f"{config_path.name} with arm {arm!r}")
    plan = {
        "version": PLAN_VERSION,
        "framework": framework,
        "config": str(config_path),
        "config_sha256": sha256(config_path),
        "eval": str(eval_path),
        "eval_sha256": sha256(eval_path),
        "arms": arms,
        "data_weights": data_weights,
        "baseline": next(iter(arms)),
        "seeds": seeds,
        "max_steps": steps,
        "launcher": launcher,
        "eval_options": eval_options,
        "learnt": args.learnt,
        "units": units,
    }
    return plan, configs


def _planned_steps(
    base: Mapping[str, Any],
    framework: str,
    arms: Mapping[str, Mapping[str, Any]],
    seed: int,
    processes: int,
    scratch: Path,
    label: str,
) -> int:
    """Every unit's optimizer steps: the config's ``max_steps``, else the baseline's epochs counted once, as its
    framework counts them."""
    if int(base.get("max_steps") or -1) > 0:
        return int(base["max_steps"])
    config = unit_config(base, framework, next(iter(arms.values())), seed, scratch / "steps", 1)
    del config["max_steps"]
    parsed = framework_check(framework, _write_yaml(scratch / "steps.yaml", config), label)
    return trl_epoch_steps(parsed, processes) if framework == "trl" else axolotl_steps(parsed, processes)


def plan_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between an existing plan and this one (``units`` follows from the rest)."""
    keys = [key for key in new if key != "units"]
    return [f"{key}: {old.get(key)!r} in OUT, {new[key]!r} now" for key in keys if old.get(key) != new[key]]


def write_plan(out: Path, plan: Mapping[str, Any], configs: Mapping[str, Mapping[str, Any]]) -> None:
    """``OUT/plan.json`` and every unit's config; an OUT holding another plan is refused."""
    existing = out / "plan.json"
    if existing.exists():
        old = json.loads(existing.read_text(encoding="utf-8"))
        differences = plan_differences(old, json.loads(json.dumps(plan)))  # compared as JSON holds them
        if differences:
            raise CLIError(f"{out} holds another plan (use another --out): " + "; ".join(differences))
    for unit in plan["units"]:
        _write_yaml(out / unit["config"], configs[unit["name"]])
    out.mkdir(parents=True, exist_ok=True)
    existing.write_text(json.dumps(plan, indent=1) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- run


def trainer_state(output_dir: Path) -> dict[str, Any] | None:
    """The Trainer's final state: ``output_dir/trainer_state.json``, else the last checkpoint's."""
    candidates = [output_dir / "trainer_state.json"]
    checkpoints = sorted(output_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name[11:]))
    for path in [*candidates, *reversed(checkpoints)]:
        if path.exists():
            state: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            return state
    return None


def log_tail(path: Path) -> str:
    """The last characters of a log (progress bars' carriage returns as new lines)."""
    if not path.exists():
        return ""
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - TAIL_CHARS))
        return handle.read().decode("utf-8", errors="replace").replace("\r", "\n")


def current_step(log: Path, steps: int) -> int | None:
    """The step the training progress bar last showed (``k/steps [``), None before the first."""
    found = re.findall(rf"(\d+)/{steps} \[", log_tail(log))
    return int(found[-1]) if found else None


def _fail(folder: Path, stage: str, returncode: int, tail: str) -> None:
    (folder / "failed.json").write_text(
        json.dumps({"stage": stage, "returncode": returncode, "log_tail": tail}, indent=1) + "\n", encoding="utf-8"
    )


class Stopped(Exception):
    """Another unit of a run with several jobs was interrupted or failed unexpectedly: this one stops too."""


class Launch:
    """How a unit's commands run: each unit's CPU threads, and the signal that stops every running unit."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self.stop = threading.Event()

    def __call__(self, command: Sequence[str], log: Path, on_poll: Callable[[], None]) -> int:
        """Run a command with stdout and stderr into ``log``, calling ``on_poll()`` every few seconds; its exit
        status."""
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        if self.threads:  # read by torch (and its BLAS) when it starts
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        with log.open("w", encoding="utf-8") as handle:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
            try:
                while process.poll() is None:
                    if self.stop.wait(POLL_SECONDS):
                        raise Stopped(command)
                    on_poll()
            except BaseException:  # interrupted: take the unit's processes down with us, it restarts on the next run
                process.terminate()
                process.wait()
                raise
        return process.returncode


def _write_trained(folder: Path, state: Mapping[str, Any], seconds: float) -> None:
    record = {"steps": state["global_step"], "seconds": round(seconds, 1), "log_history": state["log_history"]}
    (folder / "trained.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def adopt_trained(folder: Path, steps: int) -> bool:
    """Record a unit trained outside this run (a cluster job ran its command): its model saved and its Trainer state
    at the planned step. A unit killed mid-run has saved no final model and is not adopted."""
    model, state = folder / "model", trainer_state(folder / "model")
    saved = any((model / name).exists() for name in ("config.json", "adapter_config.json"))
    if not (saved and state and state.get("global_step") == steps):
        return False
    runtime = next((entry["train_runtime"] for entry in state["log_history"] if "train_runtime" in entry), 0.0)
    _write_trained(folder, state, runtime)
    return True


def train_unit(out: Path, plan: Mapping[str, Any], unit: Mapping[str, Any], say: Any, launch: Launch) -> bool:
    """Train one unit from scratch and write ``trained.json``; ``failed.json`` (and False) when it fails."""
    folder = out / unit["dir"]
    model = folder / "model"
    shutil.rmtree(model, ignore_errors=True)  # a unit killed mid-run restarts: nothing of it counts
    log, steps, started = folder / "train.log", plan["max_steps"], time.perf_counter()
    shown = [-steps]

    def show_step() -> None:  # every tenth of the run (and the last step): a line per poll would flood the terminal
        step = current_step(log, steps)
        if step is not None and (step >= shown[0] + max(1, steps // 10) or step == steps > shown[0]):
            shown[0] = step
            say(f"    {unit['name']}: step {step}/{steps}")

    code = launch(unit["command"], log, show_step)
    if code != 0:
        _fail(folder, "train", code, log_tail(log))
        return False
    state = trainer_state(model)
    if state is None or state.get("global_step") != steps:
        trained = "no trainer_state.json" if state is None else f"{state.get('global_step')} steps"
        _fail(folder, "train", code, f"trained {trained}, the plan says {steps} steps\n" + log_tail(log))
        return False
    _write_trained(folder, state, time.perf_counter() - started)
    return True


def eval_command(plan: Mapping[str, Any], folder: Path) -> list[str]:
    """``sftkey eval`` of a unit's model (full or LoRA adapter) on the plan's eval set into the unit's folder."""
    options = [part for key, value in plan["eval_options"].items() for part in (f"--{key.replace('_', '-')}", value)]
    return [
        sys.executable,
        "-m",
        "sftkey_plugin.cli.main",
        "eval",
        str(folder / "model"),
        plan["eval"],
        "-o",
        str(folder / "eval.jsonl"),
        "--summary",
        str(folder / "eval.summary.json"),
        *map(str, options),
    ]


def evaluate_unit(out: Path, plan: Mapping[str, Any], unit: Mapping[str, Any], launch: Launch) -> bool:
    """Evaluate one trained unit; ``failed.json`` (and False) when it fails."""
    folder = out / unit["dir"]
    log = folder / "eval.log"
    code = launch(eval_command(plan, folder), log, lambda: None)
    if code != 0:
        _fail(folder, "eval", code, log_tail(log))
    return code == 0


def run_units(out: Path, plan: Mapping[str, Any], say: Any, jobs: int = 1, threads: int | None = None) -> list[str]:
    """Train and evaluate every unit not done yet, ``jobs`` at a time in the plan's order; the names of the units
    that failed."""
    units, launch, lock = plan["units"], Launch(threads), threading.Lock()
    durations: list[float] = []

    def say_line(*parts: Any) -> None:  # whole lines: units running side by side print at the same time
        with lock:
            say(*parts)

    def run_unit(number: int, unit: Mapping[str, Any]) -> bool:
        folder = out / unit["dir"]
        trained, evaluated = (folder / "trained.json").exists(), (folder / "eval.summary.json").exists()
        if trained and evaluated:
            say_line(f"unit {number} of {len(units)} {unit['name']}: done before, skipped")
            return True
        remaining = math.ceil((len(units) - number + 1) / jobs)
        eta = f", ETA {sum(durations) / len(durations) * remaining / 60:.1f} min" if durations else ""
        say_line(f"unit {number} of {len(units)} {unit['name']}: {'evaluating' if trained else 'training'}{eta}")
        started = time.perf_counter()
        (folder / "failed.json").unlink(missing_ok=True)  # an earlier failure is retried
        trained = trained or adopt_trained(folder, plan["max_steps"]) or train_unit(out, plan, unit, say_line, launch)
        ok = trained and evaluate_unit(out, plan, unit, launch)
        if ok:
            seconds = time.perf_counter() - started
            durations.append(seconds)
            summary = json.loads((folder / "eval.summary.json").read_text(encoding="utf-8"))
            say_line(
                f"unit {number} of {len(units)} {unit['name']}: accuracy {summary['accuracy']:.3f}, format accuracy "
                f"{summary['format_accuracy']:.3f} ({seconds:.0f} s)"
            )
        else:
            say_line(f"    {unit['name']} failed: see {folder / 'failed.json'}")
        return ok

    if jobs <= 1:
        results = [run_unit(number, unit) for number, unit in enumerate(units, 1)]
    else:
        with ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(run_unit, number, unit) for number, unit in enumerate(units, 1)]
            try:
                results = [future.result() for future in futures]
            except BaseException:  # Ctrl-C (or a bug): units not begun never start, running ones are stopped
                launch.stop.set()
                pool.shutdown(cancel_futures=True)
                raise
    return [unit["name"] for unit, ok in zip(units, results) if not ok]


def print_commands(out: Path, plan: Mapping[str, Any]) -> None:
    """The commands that train each unit, for a user who runs them on a cluster."""
    print(f"plan: {out / 'plan.json'} ({len(plan['units'])} units of {plan['max_steps']} optimizer steps)")
    if plan.get("data_weights"):
        print(f"weights from the data ({plan['data_weights']}): plain SFT trains through SFTKey's loss at key = other")
        print("= 1 (sftkey_mode: weighted), so that every arm weighs the data the same way")
    for unit in plan["units"]:
        print(f"  {shlex.join(unit['command'])}")
    print("then the same `sftkey ab` command without --dry-run: it keeps the units trained by these commands,")
    print(f"trains the others, evaluates each and writes the report (alone: sftkey ab report {shlex.quote(str(out))})")


def report(out: Path, plot: bool = True) -> dict[str, Any]:
    """Write and print the report of an OUT folder (``ab_report``; ``plot``: with ``report.png``); the report."""
    from .ab_report import build_report, format_report, write_report

    built = build_report(out)
    write_report(out, built, plot)
    print(format_report(built))
    return built


def execute(
    out: Path, plan: Mapping[str, Any], jobs: int = 1, threads: int | None = None, plot: bool = True
) -> tuple[dict[str, Any], list[str]]:
    """Run a written plan's units not done yet, then write and print the report; the report and the failed units."""
    failed = run_units(out, plan, lambda *parts: print(*parts, flush=True), jobs, threads)
    built = report(out, plot)
    if failed:
        print(f"sftkey ab: {len(failed)} unit(s) failed: {', '.join(failed)}", file=sys.stderr)
    return built, failed


def run(args: argparse.Namespace) -> int:
    """``sftkey ab report OUT``, or plan (``--dry-run``), run and report."""
    if args.config == "report":
        if not args.report_out:
            raise CLIError("give the folder: sftkey ab report OUT")
        report(Path(args.report_out))
        return 0
    if args.report_out:
        raise CLIError(f"unexpected argument {args.report_out!r}")
    plan, configs = build_plan(args)
    out = Path(args.out).resolve()
    write_plan(out, plan, configs)
    print_commands(out, plan)
    if args.dry_run:
        return 0
    _, failed = execute(out, plan, args.jobs, args.threads)
    return 1 if failed else 0
