"""Writes every recipe YAML under recipes/axolotl/ and recipes/trl/, and the table in recipes/README.md.

    python recipes/generate.py          # rewrite the files
    python recipes/generate.py --check  # exit 1 if a file differs from what the tables below give

The recipes are plain YAML files to copy; this script only keeps the three arms of each comparison (SFTKey, plain
SFT, equal-compute SFT) identical except for the keys that define the arm. Edit the tables here, not the YAMLs.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent
PLUGIN = "sftkey_plugin.axolotl.SFTKeyPlugin"
STAGE1_EPOCHS = 3  # paper: "usually ~3 epochs"
STAGE2_EPOCHS = 1  # ours: the paper does not give the length of stage 2
WARMUP_EPOCHS = 0.5  # paper: linear warm-up over 0.5 epoch


@dataclass(frozen=True)
class Data:
    name: str
    title: str
    source: str
    steps: tuple[str, ...]  # the data-step commands for the tagged file
    result: str  # what the tagged response holds
    sequence_len: int
    sequence_note: str
    finder: str | None  # the finder that marks the answer in the untagged data (None: it cannot)
    finder_only: str  # how to train without tags, or why not


DATASETS = {
    "gsm8k": Data(
        "gsm8k",
        "GSM8K",
        "openai/gsm8k (config main, train split, 7,473 problems)",
        (
            "python recipes/data/prepare.py gsm8k data/gsm8k/raw.jsonl",
            "sftkey convert data/gsm8k/raw.jsonl data/gsm8k/tagged.jsonl --from gsm8k",
        ),
        "<Thinking>the solution</Thinking>\\n<Answer>72</Answer>: the answer is GSM8K's '#### 72' line",
        1024,
        "GSM8K problems and solutions are under 512 tokens",
        "gsm8k",
        "sftkey_finder: gsm8k on data/gsm8k/raw.jsonl (the '#### N' line is the key; *_finder_* recipes)",
    ),
    "openr1_math": Data(
        "openr1_math",
        "OpenR1-Math-220k",
        "open-r1/OpenR1-Math-220k (config default, train split, 93.7k problems)",
        (
            "python recipes/data/prepare.py openr1_math data/openr1_math/raw.jsonl",
            "sftkey convert data/openr1_math/raw.jsonl data/openr1_math/tagged.jsonl --from field "
            "--answer-field answer",
        ),
        "<Thinking>the dataset's 'solution' (its \\boxed{} included)</Thinking>\\n<Answer>the 'answer' field</Answer>",
        2048,
        "the 'solution' field (not the 16k-token R1 traces); longer ones dropped",
        "boxed",
        "sftkey_finder: boxed on data/openr1_math/raw.jsonl (the last \\boxed{} of the solution is the key)",
    ),
    "openbookqa": Data(
        "openbookqa",
        "OpenBookQA",
        "allenai/openbookqa (config additional, train split, 4,957 questions)",
        (
            "python recipes/data/prepare.py openbookqa data/openbookqa/raw.jsonl",
            "sftkey convert data/openbookqa/raw.jsonl data/openbookqa/tagged.jsonl --from answer_is",
        ),
        "<Thinking>the fact 'fact1'</Thinking>\\n<Answer>(D)</Answer> (no rationale in OpenBookQA: ours, see README)",
        512,
        "question, four options and one fact are under 256 tokens",
        "answer_is",
        "sftkey_finder: answer_is on data/openbookqa/raw.jsonl ('The answer is (D).' is the key)",
    ),
    "cot_collection": Data(
        "cot_collection",
        "CoT-Collection",
        "kaist-ai/CoT-Collection (data/CoT_collection_en.json, 1.84M examples; ours: a random 100k)",
        (
            "hf download kaist-ai/CoT-Collection data/CoT_collection_en.json --repo-type dataset "
            "--local-dir data/cot_collection/hub",
            "python recipes/data/prepare.py cot_collection data/cot_collection/raw.jsonl "
            "--input data/cot_collection/hub/data/CoT_collection_en.json --sample 100000",
            "sftkey convert data/cot_collection/raw.jsonl data/cot_collection/tagged.jsonl --from field "
            "--answer-field answer",
        ),
        "<Thinking>the 'rationale'</Thinking>\\n<Answer>the 'target'</Answer>",
        2048,
        "some source passages are long; longer examples are dropped",
        None,
        "none: the rationale does not contain the answer, so the tags (or an appended answer) are needed",
    ),
}


@dataclass(frozen=True)
class Model:
    hub: str
    short: str
    layer: str  # decoder layer class, for FSDP wrapping


MODELS = {
    "qwen3-8b-base": Model("Qwen/Qwen3-8B-Base", "Qwen3-8B-Base", "Qwen3DecoderLayer"),
    "qwen2.5-7b": Model("Qwen/Qwen2.5-7B", "Qwen2.5-7B", "Qwen2DecoderLayer"),
    "qwen2.5-3b": Model("Qwen/Qwen2.5-3B", "Qwen2.5-3B", "Qwen2DecoderLayer"),
    "qwen2.5-1.5b": Model("Qwen/Qwen2.5-1.5B", "Qwen2.5-1.5B", "Qwen2DecoderLayer"),
    "smollm3-3b-base": Model("HuggingFaceTB/SmolLM3-3B-Base", "SmolLM3-3B-Base", "SmolLM3DecoderLayer"),
}

SETUPS = {
    "fsdp": "full fine-tuning, 8 GPUs, FSDP2",
    "zero3": "full fine-tuning, 8 GPUs, DeepSpeed ZeRO-3",
    "lora": "LoRA, 1 GPU",
    "qlora": "QLoRA (4-bit), 1 GPU",
}


@dataclass(frozen=True)
class Recipe:
    framework: str  # axolotl | trl
    dataset: str
    model: str
    setup: str
    tagged: bool = True  # False: the dataset's own format, marked by a finder

    @property
    def stem(self) -> str:
        return f"{self.model}_{self.setup}" + ("" if self.tagged else "_finder")

    def path(self, arm: str) -> Path:
        return ROOT / self.framework / self.dataset / f"{self.stem}_{arm}.yaml"

    def relpath(self, arm: str) -> str:
        return str(self.path(arm).relative_to(ROOT.parent))


# Each dataset with a 7-8B model (full fine-tuning, 8 GPUs) and a 1.5-3B model (one GPU, LoRA/QLoRA); together they
# use all five of the paper's models and all four setups. GSM8K also has a finder-only variant (no tags).
RECIPES = [
    Recipe("axolotl", "gsm8k", "qwen3-8b-base", "fsdp"),
    Recipe("axolotl", "gsm8k", "qwen2.5-1.5b", "lora"),
    Recipe("axolotl", "gsm8k", "qwen2.5-1.5b", "lora", tagged=False),
    Recipe("axolotl", "openr1_math", "qwen2.5-7b", "zero3"),
    Recipe("axolotl", "openr1_math", "qwen2.5-3b", "qlora"),
    Recipe("axolotl", "openbookqa", "qwen2.5-7b", "fsdp"),
    Recipe("axolotl", "openbookqa", "smollm3-3b-base", "lora"),
    Recipe("axolotl", "cot_collection", "qwen3-8b-base", "zero3"),
    Recipe("axolotl", "cot_collection", "qwen2.5-3b", "qlora"),
    Recipe("trl", "gsm8k", "qwen3-8b-base", "fsdp"),
    Recipe("trl", "gsm8k", "qwen2.5-1.5b", "lora", tagged=False),
    Recipe("trl", "openr1_math", "qwen2.5-7b", "fsdp"),
    Recipe("trl", "openbookqa", "smollm3-3b-base", "lora"),
    Recipe("trl", "cot_collection", "qwen2.5-3b", "qlora"),
]
ARMS = ("sftkey", "sft", "sft-equal-compute")
ARM_TITLES = {
    "sftkey": "SFTKey",
    "sft": "plain SFT",
    "sft-equal-compute": "plain SFT, equal compute",
}

# ---- values -------------------------------------------------------------------------------------------------------
# An entry is (key, value, comment) or a comment line (str). Comments: "paper" = the value of arXiv 2512.21017,
# "ours" = our choice where the paper gives none (or where its value does not fit the setup).


def _epochs(arm: str) -> int:
    return STAGE1_EPOCHS if arm == "sft" else STAGE1_EPOCHS + STAGE2_EPOCHS


def _warmup(arm: str) -> float:
    return round(WARMUP_EPOCHS / _epochs(arm), 6)


def _sftkey_keys(recipe: Recipe, arm: str) -> list[Any]:
    entries: list[Any] = ["# --- SFTKey (the sftkey_* keys are the same for Axolotl and TRL) ---"]
    if recipe.framework == "axolotl":
        entries.append(("plugins", [PLUGIN], "without it Axolotl drops every sftkey_* key silently"))
    entries.append(("sftkey", True, None))
    if arm == "sftkey":
        entries += [
            ("sftkey_mode", "two_stage", "paper: stage 1 plain SFT, stage 2 loss on the key answer tokens only"),
            (
                "sftkey_stage2_epoch",
                STAGE1_EPOCHS,
                f"ours: stage 2 = the last {STAGE2_EPOCHS} epoch (paper: after stage 1 'converges', length unknown)",
            ),
        ]
    else:
        entries += [
            ("sftkey_mode", "weighted", "with both weights 1.0 this is plain SFT exactly (README: weighted mode)"),
            ("sftkey_key_weight", 1.0, "plain SFT: the key tokens weigh as much as the others"),
            ("sftkey_other_weight", 1.0, "kept on only to log sftkey/key_loss and reasoning_loss like the twin"),
        ]
    if recipe.tagged:
        entries.append(("sftkey_finder", "tags", "paper: the key is everything after </Thinking> (the data step)"))
    else:
        finder = DATASETS[recipe.dataset].finder
        entries.append(("sftkey_finder", finder, "ours: no tags; the finder marks the dataset's own answer line"))
    entries += [
        (
            "sftkey_on_missing",
            "drop",
            "ours: no key span (or cut by the length limit): left out of all three arms alike",
        ),
        ("sftkey_include_eos", True, "ours (paper: unknown): the end-of-turn token after the answer is key"),
    ]
    return entries


def _arm_training(recipe: Recipe, arm: str) -> list[Any]:
    epochs_key = "num_epochs" if recipe.framework == "axolotl" else "num_train_epochs"
    warmup_key = "warmup_ratio" if recipe.framework == "axolotl" else "warmup_steps"
    epochs_note = {
        "sftkey": f"{STAGE1_EPOCHS} (stage 1, paper: ~3 epochs) + {STAGE2_EPOCHS} (stage 2, ours)",
        "sft": "paper: ~3 epochs; the same as SFTKey's stage 1",
        "sft-equal-compute": "as many optimizer steps as SFTKey's stage 1 + stage 2",
    }[arm]
    warmup_note = f"paper: linear warm-up over {WARMUP_EPOCHS} epoch ({WARMUP_EPOCHS} / {_epochs(arm)} epochs)"
    if recipe.framework == "trl":
        warmup_note += "; a float < 1 is a ratio"
    return [(epochs_key, _epochs(arm), epochs_note), (warmup_key, _warmup(arm), warmup_note)]


def _lr(recipe: Recipe) -> tuple[float, str]:
    if recipe.setup in ("lora", "qlora"):
        return 1.0e-4, "ours: the paper's 5e-6 is for full fine-tuning; adapters need more"
    return 5.0e-6, "paper"


def _optimization(recipe: Recipe) -> list[Any]:
    """Learning rate, schedule, optimizer, clipping and precision, under each framework's key names."""
    axolotl = recipe.framework == "axolotl"
    lr, lr_note = _lr(recipe)
    return [
        ("learning_rate", lr, lr_note),
        (
            "lr_scheduler" if axolotl else "lr_scheduler_type",
            "constant_with_warmup",
            "ours (paper: warm-up only); constant: one run = the two stages run apart",
        ),
        ("weight_decay", 0.1, "paper"),
        ("optimizer" if axolotl else "optim", "adamw_torch_fused", "ours (paper: unknown, AdamW likely)"),
        ("max_grad_norm", 1.0, "ours (the Trainer default)"),
        ("bf16", True, "paper"),
    ]


def _batch(recipe: Recipe) -> list[Any]:
    micro = "micro_batch_size" if recipe.framework == "axolotl" else "per_device_train_batch_size"
    if recipe.setup in ("fsdp", "zero3"):
        return [
            (micro, 4, "ours: 4 x 8 accumulation = per-device batch 32 (paper), global 256"),
            ("gradient_accumulation_steps", 8, None),
        ]
    return [
        (micro, 8, "ours: 8 x 4 accumulation = per-device batch 32 (paper); global 32 on one GPU"),
        ("gradient_accumulation_steps", 4, None),
    ]


def _header(recipe: Recipe, arm: str) -> list[str]:
    data, model = DATASETS[recipe.dataset], MODELS[recipe.model]
    framework = "Axolotl" if recipe.framework == "axolotl" else "TRL"
    lines = [
        f"{ARM_TITLES[arm]} | {data.title} | {model.hub} | {SETUPS[recipe.setup]} | {framework}",
        "",
    ]
    n1, n2 = STAGE1_EPOCHS, STAGE2_EPOCHS
    untagged = " tagged" if recipe.tagged else " untagged"
    paper_key = "the paper's SFTKey-Tag" if recipe.tagged else "without tags: ours; the paper's SFTKey-Tag uses them"
    if arm == "sftkey":
        arm_text = (
            f"This arm: SFTKey ({paper_key}). One run of {n1 + n2} epochs: epochs 1-{n1} are plain SFT on "
            f"the{untagged} data (stage 1), epoch {n1 + n2} trains only the key answer tokens (stage 2)."
        )
    elif arm == "sft":
        paper_arm = "SFT-Tag" if recipe.tagged else "SFT (no tags)"
        arm_text = (
            f"This arm: plain SFT, {n1} epochs (the paper's {paper_arm} baseline: SFTKey's stage 1 alone). With the "
            f"learning rate constant after the warm-up, it is the first {n1} epochs of the SFTKey run (same seed and "
            "data order; the warm-up step count may round differently)."
        )
    else:
        arm_text = (
            f"This arm: plain SFT, {n1 + n2} epochs: as many optimizer steps as SFTKey's stage 1 + stage 2 (the "
            "equal-compute baseline reviewers asked for; not in the paper)."
        )
    lines += [
        arm_text,
        "The plain-SFT arms keep the plugin in weighted mode 1.0/1.0 (plain SFT exactly) so that all three arms log "
        "the same sftkey/* metrics and train on the same examples. Compare the three arms:",
    ]
    for other in ARMS:
        mark = "  <- this file" if other == arm else ""
        lines.append(f"  {recipe.path(other).name:<48} {ARM_TITLES[other]}{mark}")
    lines += ["", "Data step (once, from the repository root; recipes/README.md explains each dataset):"]
    steps = data.steps if recipe.tagged else data.steps[:-1]
    lines += [f"  {step}" for step in steps]
    if recipe.tagged:
        lines.append(f"  -> {data.result}")
    else:
        lines.append(f"  -> no tags: {data.finder_only}")
    lines += ["", "Check, then launch (from the repository root):"]
    path = recipe.relpath(arm)
    if recipe.framework == "axolotl":
        lines.append(f"  axolotl sftkey-preview {path}")
        if recipe.setup in ("fsdp", "zero3"):
            lines.append(f"  axolotl train {path} --launcher accelerate -- --num_processes 8")
        else:
            lines.append(f"  CUDA_VISIBLE_DEVICES=0 axolotl train {path}")
    else:
        tagged_file = _data_file(recipe)
        finder = "tags" if recipe.tagged else DATASETS[recipe.dataset].finder
        lines.append(
            f"  sftkey preview {tagged_file} --tokenizer {model.hub} --finder {finder} --max-length {data.sequence_len}"
        )
        if recipe.setup == "fsdp":
            lines.append(
                "  accelerate launch --config_file recipes/trl/accelerate/fsdp2_8gpu.yaml -m sftkey_plugin.cli.train "
                f"--config {path}"
            )
        else:
            lines.append(f"  CUDA_VISIBLE_DEVICES=0 sftkey train --config {path}")
    lines += [
        "",
        'Comments below: "paper" = the value in arXiv 2512.21017; "ours" = our choice (the paper does not say).',
    ]
    return lines


def _data_file(recipe: Recipe) -> str:
    return f"data/{recipe.dataset}/{'tagged' if recipe.tagged else 'raw'}.jsonl"


def _output_dir(recipe: Recipe, arm: str) -> str:
    return f"outputs/{recipe.framework}/{recipe.dataset}/{recipe.stem}_{arm}"


def axolotl_entries(recipe: Recipe, arm: str) -> list[Any]:
    data, model = DATASETS[recipe.dataset], MODELS[recipe.model]
    entries: list[Any] = [
        "# --- model ---",
        ("base_model", model.hub, "paper model (base version)"),
    ]
    if recipe.setup == "qlora":
        entries.append(("load_in_4bit", True, "ours: QLoRA for one GPU (the paper fine-tunes all parameters)"))
    entries.append(
        (
            "chat_template",
            "chatml",
            "ours (paper: unknown): one template for all models (Qwen3's adds <think></think>)",
        )
    )
    entries.append(
        (
            "special_tokens",
            {"eos_token": "<|im_end|>"},
            "ChatML's end of turn as EOS: trained, a key token, and where generation stops",
        )
    )
    entries += _sftkey_keys(recipe, arm)
    entries += [
        "# --- data ---",
        (
            "datasets",
            [
                {
                    "path": _data_file(recipe),
                    "ds_type": "json",
                    "type": "chat_template",
                    "field_messages": "messages",
                    "roles_to_train": ["assistant"],
                    "train_on_eos": "turn",
                }
            ],
            "the plugin tokenises chat_template datasets with its own strategy (adds the key mask)",
        ),
        (
            "dataset_prepared_path",
            f"prepared/{recipe.dataset}",
            "the plugin appends sftkey-<hash of the marking options>",
        ),
        ("val_set_size", 0.02, "ours: 2% held out for eval_loss and eval_sftkey/* (0: train on all)"),
        ("sequence_len", data.sequence_len, f"ours (paper: unknown): {data.sequence_note}"),
        ("sample_packing", False, "ours: a batch stays 32 examples as in the paper; true is faster"),
        "# --- training ---",
        *_arm_training(recipe, arm),
        *_batch(recipe),
        *_optimization(recipe),
        ("attn_implementation", "sdpa", "ours: flash_attention_2 works too where flash-attn is installed"),
    ]
    if recipe.setup != "fsdp":
        entries.append(("gradient_checkpointing", True, "ours: memory"))
    entries.append(("seed", 42, "ours: the same seed (and data order) in all three arms"))
    if recipe.setup in ("lora", "qlora"):
        entries += [
            "# --- adapter (ours: the paper fine-tunes all parameters) ---",
            ("adapter", recipe.setup, None),
            ("lora_r", 32, "ours"),
            ("lora_alpha", 64, "ours"),
            ("lora_dropout", 0.05, "ours"),
            ("lora_target_linear", True, "ours: every linear layer"),
        ]
    if recipe.setup == "fsdp":
        entries += [
            "# --- 8 GPUs: FSDP2 (ours; the paper used 8 x A100 40GB, framework unknown) ---",
            ("fsdp_version", 2, None),
            (
                "fsdp_config",
                {
                    "offload_params": False,
                    "cpu_ram_efficient_loading": True,
                    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                    "transformer_layer_cls_to_wrap": model.layer,
                    "state_dict_type": "FULL_STATE_DICT",
                    "reshard_after_forward": True,
                    "activation_checkpointing": True,
                },
                "activation checkpointing here, not gradient_checkpointing, under FSDP2",
            ),
        ]
    if recipe.setup == "zero3":
        entries += [
            "# --- 8 GPUs: DeepSpeed ZeRO-3 (ours; the paper used 8 x A100 40GB, framework unknown) ---",
            (
                "deepspeed",
                "recipes/axolotl/deepspeed/zero3_bf16.json",
                "= Axolotl's deepspeed_configs/zero3_bf16.json, stage3_ key names",
            ),
        ]
    entries += [
        "# --- output ---",
        ("output_dir", _output_dir(recipe, arm), None),
        ("logging_steps", 10, None),
        ("saves_per_epoch", 1, "SFTKey's epoch-3 checkpoint is the end of its stage 1"),
        ("evals_per_epoch", 2, None),
    ]
    return entries


def trl_entries(recipe: Recipe, arm: str) -> list[Any]:
    data, model = DATASETS[recipe.dataset], MODELS[recipe.model]
    entries: list[Any] = [
        "# --- model (trl.ModelConfig) ---",
        ("model_name_or_path", model.hub, "paper model (base version)"),
        ("dtype", "bfloat16", "paper: bf16"),
        ("attn_implementation", "sdpa", "ours: flash_attention_2 works too where flash-attn is installed"),
    ]
    if recipe.setup in ("lora", "qlora"):
        entries += [
            ("use_peft", True, "ours: the paper fine-tunes all parameters"),
            ("lora_r", 32, "ours"),
            ("lora_alpha", 64, "ours"),
            ("lora_dropout", 0.05, "ours"),
            ("lora_target_modules", "all-linear", "ours: every linear layer"),
        ]
    if recipe.setup == "qlora":
        entries += [
            ("load_in_4bit", True, "ours: QLoRA for one GPU"),
            ("bnb_4bit_quant_type", "nf4", "ours"),
        ]
    entries += [
        "# --- data (trl.ScriptArguments; sftkey train also reads local .jsonl/.json/.parquet files) ---",
        ("dataset_name", _data_file(recipe), "written by the data step above"),
        ("dataset_train_split", "train", None),
    ]
    entries += _sftkey_keys(recipe, arm)
    entries += [
        "# --- training (SFTKeyConfig = trl.SFTConfig + the sftkey_* keys) ---",
        (
            "chat_template_path",
            "recipes/trl/chatml.jinja",
            "ours (paper: unknown): ChatML with {% generation %} marks",
        ),
        ("assistant_only_loss", True, "paper: loss on the response only (the prompt is not trained)"),
        ("eos_token", "<|im_end|>", "ChatML's end of turn as EOS: a key token, and where generation stops"),
        ("max_length", data.sequence_len, f"ours (paper: unknown): {data.sequence_note}"),
        ("packing", False, "ours: a batch stays 32 examples as in the paper"),
        ("loss_type", "nll", "all sftkey/* metrics on any trl (trl < 1.10 defaults to chunked_nll)"),
        ("dataset_num_proc", 8, "ours"),
        *_arm_training(recipe, arm),
        *_batch(recipe),
        *_optimization(recipe),
        ("gradient_checkpointing", True, "ours: memory (transformers >= 5.24 also calls it activation_checkpointing)"),
        ("seed", 42, "ours: the same seed (and data order) in all three arms"),
        "# --- output ---",
        ("output_dir", _output_dir(recipe, arm), None),
        ("logging_steps", 10, None),
        ("save_strategy", "epoch", "SFTKey's epoch-3 checkpoint is the end of its stage 1"),
    ]
    return entries


# ---- rendering ----------------------------------------------------------------------------------------------------


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def _render_entry(key: str, value: Any, comment: str | None) -> list[str]:
    note = f"  # {comment}" if comment else ""
    if isinstance(value, (dict, list)) and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        block = yaml.safe_dump({key: value}, default_flow_style=False, sort_keys=False, width=1000).rstrip("\n")
        lines = block.split("\n")
        return [lines[0] + note, *lines[1:]]
    return [f"{key}: {_scalar(value)}{note}"]


def _wrap(lines: list[str]) -> list[str]:
    """Header lines as comments: prose wrapped at 116 characters, indented lines (commands) kept whole."""
    out: list[str] = []
    for line in lines:
        if not line or line.startswith(" "):
            out.append(f"# {line}".rstrip())
        else:
            out += [f"# {part}" for part in textwrap.wrap(line, 116)]
    return out


def render(recipe: Recipe, arm: str) -> str:
    lines = _wrap(_header(recipe, arm))
    entries = axolotl_entries(recipe, arm) if recipe.framework == "axolotl" else trl_entries(recipe, arm)
    for entry in entries:
        if isinstance(entry, str):
            lines += ["", entry]
        else:
            lines += _render_entry(*entry)
    return "\n".join(lines) + "\n"


def readme_table() -> str:
    rows = [
        "| recipe (SFTKey arm) | framework | dataset | model | data / finder | hardware "
        "| twins (plain SFT; equal compute) |",
        "|---|---|---|---|---|---|---|",
    ]
    for recipe in RECIPES:
        model = MODELS[recipe.model]
        data = "tagged, `tags`" if recipe.tagged else f"raw, `{DATASETS[recipe.dataset].finder}`"
        twins = "; ".join(f"`{recipe.path(arm).name}`" for arm in ARMS[1:])
        rows.append(
            f"| [`{recipe.relpath('sftkey')}`]({recipe.path('sftkey').relative_to(ROOT)}) | {recipe.framework} | "
            f"{DATASETS[recipe.dataset].title} | {model.short} | {data} | {SETUPS[recipe.setup]} | {twins} |"
        )
    return "\n".join(rows)


BEGIN, END = "<!-- BEGIN RECIPES TABLE (python recipes/generate.py) -->", "<!-- END RECIPES TABLE -->"


def expected_files() -> dict[Path, str]:
    files = {recipe.path(arm): render(recipe, arm) for recipe in RECIPES for arm in ARMS}
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    files[readme] = text[:start] + "\n" + readme_table() + "\n" + text[end:]
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report files that differ")
    args = parser.parse_args(argv)
    stale = []
    for path, text in expected_files().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    for path in stale:
        print(f"{'differs' if args.check else 'wrote'}: {path.relative_to(ROOT.parent)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
