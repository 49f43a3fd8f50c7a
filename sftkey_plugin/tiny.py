"""A tiny byte-level BPE tokenizer (ChatML template) and a tiny random Llama, built offline in seconds.

For tests, examples, benchmarks and the demo: there is no model hub here, so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def default_texts() -> list[str]:
    """Generated task text plus the finders' markers and some non-ASCII, so every test string tokenises sensibly."""
    from .examples import arithmetic_records

    texts = [r["text"] for r in arithmetic_records(300, seed=123, form="text")]
    return (
        texts + ["The answer is (B). #### 42 \\boxed{7} </think> Final Answer: é ü 漢字 🙂 user assistant system"] * 20
    )


def build_tokenizer(
    path: str | None, vocab_size: int = 400, texts: Iterable[str] | None = None, split_digits: bool = False
) -> Any:
    """A byte-level BPE (``<|im_end|>`` = EOS, ChatML template) trained on ``texts``; saved to ``path`` if given.

    ``split_digits`` makes every digit a token of its own: a tiny model learns column arithmetic, not a lookup table.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    digits = pre_tokenizers.Digits(individual_digits=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level]) if split_digits else byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bar goes to stdout, which the CLI's --json output must keep clean
    )
    tok.train_from_iterator(list(texts) if texts is not None else default_texts(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    fast.chat_template = CHATML
    if path is not None:
        fast.save_pretrained(path)
    return fast


def build_model(path: str | None, vocab_size: int, seed: int = 0, hidden_size: int = 48, layers: int = 2) -> Any:
    """A random ``LlamaForCausalLM`` (4 heads, 2 KV heads, MLP 2x hidden); saved to ``path`` if given."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    if path is not None:
        model.save_pretrained(path)
    return model
