"""``SFTKeyPlugin``: the Axolotl ``BasePlugin`` (``plugins: [sftkey_plugin.axolotl.SFTKeyPlugin]``)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from typing import Any

from axolotl.integrations.base import BasePlugin

from ..config import sftkey_arguments_from
from .args import PLUGIN_NAME, STRATEGY_TYPE

logger = logging.getLogger("sftkey_plugin")

# Bump when the way the strategy marks tokens changes, so prepared datasets from older versions are not reused.
MARKING_VERSION = 3  # 2: every trained assistant turn, reasoning_content answers, turn counts; 3: data weights
DEFAULT_DATASET_PREPARED_PATH = "last_run_prepared"  # axolotl.common.const, not imported to keep register() light


def marking_fingerprint(cfg: Any) -> str:
    """A short hash of every option that changes the prepared rows (finder, options, edge/EOS policy, drops, the
    data-weight fields and the prompt weight)."""
    arguments = sftkey_arguments_from(cfg)
    options = arguments.sftkey_finder_options
    if isinstance(options, str):
        with contextlib.suppress(json.JSONDecodeError):  # the validator reports it
            options = json.loads(options)
    payload = {
        "version": MARKING_VERSION,
        "finder": arguments.sftkey_finder,
        "finder_options": options or {},
        "edge_tokens": arguments.sftkey_edge_tokens,
        "include_eos": arguments.sftkey_include_eos,
        "turns": arguments.sftkey_turns,
        "reasoning_field": arguments.sftkey_reasoning_field,
        "on_missing": arguments.sftkey_on_missing,
        "message_weight_field": arguments.sftkey_message_weight_field,
        "example_weight_field": arguments.sftkey_example_weight_field,
        "prompt_weight": arguments.sftkey_prompt_weight,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


# What Axolotl's ``calculate_total_num_steps`` stores in the config from the first rows it counts and reuses in every
# later count: the token totals and, with sample_packing, the packing efficiency measured on those rows.
STEP_COUNT_CACHE = ("total_num_tokens", "total_supervised_tokens", "sample_packing_eff_est")


def steps_of_kept_rows(cfg: Any, train: Any, configured: dict[str, Any]) -> int:
    """Axolotl's count of training steps for ``train`` as for a file holding only these rows: its caches reset to
    the values the config came with (``configured``), so the kept rows are counted and packed afresh, not estimated
    from the totals of the rows before the drop; an int (the estimate times a float ``num_epochs`` is a float)."""
    from axolotl.utils.trainer import calculate_total_num_steps

    for key, value in configured.items():
        cfg[key] = value
    steps = int(calculate_total_num_steps(cfg, train))
    return min(steps, cfg.max_steps) if cfg.get("max_steps") else steps


class _ToAxolotlLog(logging.Handler):
    """Re-emit ``sftkey_plugin`` records as ``axolotl.sftkey_plugin`` so Axolotl's console shows them (its handlers
    pass only ``axolotl*`` records below WARNING)."""

    def emit(self, record: logging.LogRecord) -> None:
        record = logging.makeLogRecord(record.__dict__)
        record.name = f"axolotl.{record.name}"
        logging.getLogger("axolotl.sftkey_plugin").handle(record)


def route_logs_to_axolotl() -> None:
    if not any(isinstance(handler, _ToAxolotlLog) for handler in logger.handlers):
        logger.addHandler(_ToAxolotlLog())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    for log_filter in list(logger.filters):  # Axolotl's logger class hides non-axolotl INFO records
        if type(log_filter).__name__ == "AxolotlOrWarnErrorFilter":
            logger.removeFilter(log_filter)


def plugin_discovered() -> bool:
    """Whether Axolotl loads this plugin without a ``plugins:`` entry: 0.21 and later load the ``axolotl.plugins``
    entry points of the installed distributions (this package registers one); 0.19 has no such discovery."""
    try:
        from axolotl.integrations.base import get_builtin_plugins
    except ImportError:
        return False
    return PLUGIN_NAME in get_builtin_plugins()


class SFTKeyPlugin(BasePlugin):
    """SFTKey for Axolotl: ``sftkey: true`` plus the ``sftkey_*`` keys (same names and meanings as on the TRL side).

    - ``register``: rewrites ``type: chat_template`` datasets to the SFTKey strategy and appends the marking
      options' hash to ``dataset_prepared_path`` (Axolotl's dataset hash ignores plugin keys).
    - ``get_input_args``: the ``sftkey_*`` keys and the validators.
    - ``get_training_args``: counts loss tokens over all processes (``average_tokens_across_devices``).
    - ``get_trainer_cls``: ``SFTKeyAxolotlTrainer`` (None when sftkey is off; RL and reward trainers are refused by
      the validators).
    """

    def register(self, cfg: dict) -> None:
        if not cfg.get("sftkey"):
            return
        route_logs_to_axolotl()
        for key in ("datasets", "test_datasets"):
            for dataset in cfg.get(key) or []:
                if isinstance(dataset, dict) and dataset.get("type") == "chat_template":
                    dataset["type"] = STRATEGY_TYPE
                    logger.info("SFTKey: %s with type chat_template tokenised by %s.", key, STRATEGY_TYPE)
        suffix = f"sftkey-{marking_fingerprint(cfg)}"
        base = str(cfg.get("dataset_prepared_path") or DEFAULT_DATASET_PREPARED_PATH).rstrip("/")
        if not base.endswith(suffix):
            cfg["dataset_prepared_path"] = f"{base}/{suffix}"

    def load_datasets(self, cfg: Any, preprocess: bool = False) -> Any:
        """With ``sftkey_on_missing: drop``: Axolotl's own loading, then the rows without a key span dropped after
        they are counted (``sftkey_min_found`` counts them, as on the TRL side) and the training steps counted again
        as Axolotl counts a file without those rows; otherwise None (Axolotl loads the data itself)."""
        if not cfg.get("sftkey") or cfg.get("sftkey_on_missing") != "drop" or preprocess or cfg.get("rl"):
            return None
        from axolotl.common.datasets import TrainDatasetMeta
        from axolotl.common.datasets import load_datasets as axolotl_load_datasets
        from axolotl.loaders import load_tokenizer
        from axolotl.utils.distributed import init_distributed_state

        from ..hf_trainer import main_process_first
        from .trainer import PRE_DROP_STATS, mark_count_and_apply_policy

        configured = {key: cfg.get(key) for key in STEP_COUNT_CACHE}
        meta = axolotl_load_datasets(cfg=cfg)
        tokenizer, arguments = load_tokenizer(cfg), sftkey_arguments_from(cfg)

        def mark_and_drop() -> tuple[Any, Any, dict[str, Any]]:
            train, stats = mark_count_and_apply_policy(meta.train_dataset, "train", tokenizer, arguments, cfg)
            counts, evaluation = {"train": stats}, meta.eval_dataset
            if evaluation is not None:
                evaluation, counts["eval"] = mark_count_and_apply_policy(evaluation, "eval", tokenizer, arguments, cfg)
            return train, evaluation, counts

        init_distributed_state()  # the process group as Axolotl sets it up (its timeout), if this run has several
        # As Axolotl and TRL prepare data: the main process first, then the others (a refusal stops every process,
        # none is left at a barrier). What this writes is datasets' cache of the filter (and of the marking map for
        # non-chat types) beside a prepared dataset loaded from disk: a temporary file renamed, so the processes
        # that follow may write the same one at once. The step count below gathers over the processes: not in here.
        train, evaluation, counts = main_process_first(mark_and_drop)
        cfg[PRE_DROP_STATS] = counts
        if not counts["train"].dropped:
            return TrainDatasetMeta(train, evaluation, meta.total_num_steps)
        return TrainDatasetMeta(train, evaluation, steps_of_kept_rows(cfg, train, configured))

    def get_input_args(self) -> str:
        return "sftkey_plugin.axolotl.args.SFTKeyInputArgs"

    def get_training_args(self, cfg: Any) -> dict[str, Any] | None:
        if not cfg.get("sftkey"):
            return None
        # Axolotl 0.19 turns this off, so each process divides by its own token count and DDP averages the results:
        # in a key-only step a process without key tokens adds a 0 to that average, and one with few key tokens
        # weighs each more. Counting over all processes (transformers' and TRL's default) gives the global mean.
        return {"average_tokens_across_devices": True}

    def get_trainer_cls(self, cfg: Any):  # type: ignore[no-untyped-def]
        if not cfg.get("sftkey"):
            return None
        from .trainer import SFTKeyAxolotlTrainer

        return SFTKeyAxolotlTrainer

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        if not cfg.get("sftkey"):
            return
        from .trainer import SFTKeyAxolotlTrainer

        if not isinstance(trainer, SFTKeyAxolotlTrainer):
            raise RuntimeError(
                f"SFTKey: the trainer is {type(trainer).__name__}, not SFTKeyAxolotlTrainer: another plugin listed "
                "before sftkey_plugin.axolotl.SFTKeyPlugin supplies its own trainer. Remove that plugin or set "
                "sftkey: false."
            )
        trainer.sftkey_configure(cfg)
