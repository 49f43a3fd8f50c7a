"""Weights from the data (message, example, prompt) through SFTKeyTrainer on a tiny model: exact against a hand
computation, refusals, counts; and the core functions on their own."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import trl
from test_trl import GRAD_RTOL, PER_TOKEN, assert_gradients_close, gradients_of_first_step, losses, trainer_for

from sftkey_plugin.config import SFTKeyArguments, validate_sftkey_arguments
from sftkey_plugin.examples import arithmetic_records
from sftkey_plugin.weights import DataWeightOptions, compose_data_weights, message_token_weights, record_weights

# run in every test environment, on its trl (1.16, and the Axolotl stacks' 1.9 and 1.14.1): scripts/test.sh
pytestmark = pytest.mark.stack

KEY, OTHER, PROMPT = 2.0, 0.5, 0.1
MESSAGE_WEIGHTS = [0.5, 2.0, 0.0, None]  # None: no weight on the message (1)
EXAMPLE_WEIGHTS = [1.5, None, 1.0, 0.25]


def weighted_records() -> list[dict]:
    """Four conversational prompt/completion records with a message weight, an example weight, or neither."""
    records = arithmetic_records(4, seed=5, form="prompt_completion")
    for record, message, example in zip(records, MESSAGE_WEIGHTS, EXAMPLE_WEIGHTS):
        if message is not None:
            record["completion"][0]["weight"] = message
        record["score"] = example
    return records


def hand_loss(model, tokenizer, records, normalize="tokens"):
    """``sum(w * nll) / n`` written out from the records: the prompt (the chat render with the generation prompt)
    weighs PROMPT x example weight from its second token on, each completion token message x example x KEY or
    OTHER (key tokens: the trainer's own key mask, checked elsewhere), ``n`` the tokens of weight != 0 or their
    weight sum."""
    total, denominator = 0.0, 0.0
    for record, mask in records:
        prompt_ids = tokenizer.apply_chat_template(record["prompt"], add_generation_prompt=True, tokenize=False)
        n_prompt = len(tokenizer(prompt_ids, add_special_tokens=False)["input_ids"])
        text = tokenizer.apply_chat_template(record["prompt"] + record["completion"], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        example = record["score"] if record["score"] is not None else 1.0
        message = record["completion"][0].get("weight")
        message = 1.0 if message is None else message
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
        for t in range(1, len(ids)):
            w = PROMPT * example if t < n_prompt else message * example * (KEY if mask[t] else OTHER)
            if w == 0:
                continue
            total = total + w * -log_probs[t - 1, ids[t]]
            denominator += w if normalize == "weights" else 1
    return total / max(denominator, 1)


def weighted_trainer(tiny_dir, out, records, **overrides):
    settings = dict(
        sftkey=True,
        sftkey_mode="weighted",
        sftkey_key_weight=KEY,
        sftkey_other_weight=OTHER,
        sftkey_prompt_weight=PROMPT,
        sftkey_example_weight_field="score",
        max_steps=1,
        max_grad_norm=0.0,  # compare raw gradients, not clipped ones
        **PER_TOKEN,
    )
    settings.update(overrides)
    return trainer_for(tiny_dir, records, out, **settings)


LAYOUTS = {
    "padded": {},
    "accumulation": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4},
    "packing": {"packing": True},
    "padding_free": {"padding_free": True, "max_length": None},
}


@pytest.mark.parametrize("normalize", ["tokens", "weights"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_loss_and_gradients_equal_the_hand_computation(tiny_dir, tokenizer, tmp_path, layout, normalize):
    """One optimizer step over the four records (message, example and prompt weights, key 2.0 / other 0.5) gives
    the hand-computed loss and gradients, padded, accumulated over 4 micro-batches, packed and padding-free."""
    from transformers import AutoModelForCausalLM

    records = weighted_records()
    if layout == "padding_free" and not hasattr(trl.SFTConfig, "padding_free"):
        pytest.skip("no padding_free in this trl")
    trainer = weighted_trainer(tiny_dir, tmp_path, records, sftkey_normalize=normalize, **LAYOUTS[layout])
    masks = weighted_trainer(tiny_dir, tmp_path / "rows", records).train_dataset["sftkey_mask"]
    grads = gradients_of_first_step(trainer)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    expected = hand_loss(model, tokenizer, list(zip(records, masks)), normalize)
    expected.backward()
    expected_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert losses(trainer)[0] == pytest.approx(float(expected.detach()), rel=GRAD_RTOL)
    assert_gradients_close(grads, expected_grads)


def test_prepared_rows_carry_the_weights_and_the_prompt_labels(tiny_dir, tokenizer, tmp_path, caplog):
    records = weighted_records()
    with caplog.at_level(logging.INFO, logger="sftkey_plugin"):
        trainer = weighted_trainer(tiny_dir, tmp_path, records)
        trainer.train()
    row = trainer.train_dataset[0]
    n = len(row["input_ids"])
    assert len(row["sftkey_weight"]) == len(row["sftkey_prompt"]) == len(row["sftkey_mask"]) == n
    prompt = [i for i in range(n) if row["sftkey_prompt"][i]]
    assert prompt and prompt[0] == 1  # the first token is never a target
    assert all(row["labels"][i] == row["input_ids"][i] for i in prompt)
    assert [row["sftkey_weight"][i] for i in prompt] == pytest.approx([PROMPT * 1.5] * len(prompt))
    completion = [i for i in range(n) if row["labels"][i] != -100 and not row["sftkey_prompt"][i]]
    assert [row["sftkey_weight"][i] for i in completion] == pytest.approx([0.5 * 1.5] * len(completion))
    summary = next(r.getMessage() for r in caplog.records if "SFTKey train data" in r.getMessage())
    zero = sum(1 for i, label in enumerate(trainer.train_dataset[2]["labels"]) if label != -100) - sum(
        trainer.train_dataset[2]["sftkey_prompt"]
    )
    assert "data weights: 4 of 4 records weighted" in summary
    assert f"{zero} tokens at weight 0" in summary
    mean = [h["sftkey/mean_weight"] for h in trainer.state.log_history if "sftkey/mean_weight" in h]
    assert len(mean) == 1 and 0 < mean[0] < KEY * 2.0 * 1.5


def test_no_data_weights_trains_as_before(tiny_dir, tmp_path):
    """Without weights in the data (prompt weight 0) no data-weight column is made and the run trains bit for bit as
    with every data weight 1 (the weights path with nothing to weigh): both are the plain weighted loss."""
    records = arithmetic_records(8, seed=1, form="prompt_completion")
    common = dict(sftkey=True, sftkey_mode="weighted", sftkey_key_weight=3.0, sftkey_other_weight=0.5, **PER_TOKEN)
    plain = trainer_for(tiny_dir, records, tmp_path / "plain", **common)
    assert "sftkey_weight" not in plain.train_dataset.column_names
    scored = [{**r, "score": 1.0} for r in records]
    ones = trainer_for(tiny_dir, scored, tmp_path / "ones", sftkey_example_weight_field="score", **common)
    assert "sftkey_weight" in ones.train_dataset.column_names
    plain.train()
    ones.train()
    assert losses(plain) == losses(ones)
    for (name, p), q in zip(plain.model.named_parameters(), ones.model.parameters()):
        assert torch.equal(p, q), name


def test_plain_sft_with_data_weights_needs_no_key(tiny_dir, tmp_path):
    """weighted 1.0/1.0 with message weights is plain SFT with data weights: sftkey_min_found does not refuse it
    when no record has a key span."""
    records = arithmetic_records(4, seed=2, form="prompt_completion")
    for record, weight in zip(records, [0.5, 2.0, 1.0, 0.0]):
        record["completion"][0]["content"] = "no answer here"
        record["completion"][0]["weight"] = weight
    trainer = trainer_for(tiny_dir, records, tmp_path, sftkey=True, sftkey_mode="weighted", max_steps=1, **PER_TOKEN)
    assert not any(1 in mask for mask in trainer.train_dataset["sftkey_mask"])
    weights = [set(row) - {0.0} for row in trainer.train_dataset["sftkey_weight"]]
    assert weights == [{0.5}, {2.0}, {1.0}, set()]
    trainer.train()
    assert math.isfinite(losses(trainer)[0])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["completion"][0].update(weight=-1.0), "record 1: .*negative .*not unlikelihood training"),
        (lambda r: r["completion"][0].update(weight=float("nan")), "record 1: .*weights must be finite"),
        (lambda r: r["completion"][0].update(weight=float("inf")), "record 1: .*weights must be finite"),
        (lambda r: r["prompt"][0].update(weight=2.0), "record 1: message 0 \\(user\\).*only assistant messages"),
        (lambda r: r.update(score=-2), "record 1: 'score' is negative"),
    ],
)
def test_bad_weights_are_refused_naming_the_record(tiny_dir, tmp_path, change, message):
    records = arithmetic_records(3, seed=4, form="prompt_completion")
    for record in records:
        record["score"] = 1.0
        record["completion"][0]["weight"] = 1.0
        record["prompt"][0]["weight"] = None
    change(records[1])
    with pytest.raises(ValueError, match=message):
        trainer_for(tiny_dir, records, tmp_path, sftkey=True, sftkey_example_weight_field="score", **PER_TOKEN)


def test_a_weight_that_is_not_a_number_is_refused(tiny_dir, tmp_path):
    records = [{**r, "score": "high"} for r in arithmetic_records(2, seed=4, form="prompt_completion")]
    with pytest.raises(ValueError, match="record 0: 'score' is not a number \\('high'\\)"):
        trainer_for(tiny_dir, records, tmp_path, sftkey=True, sftkey_example_weight_field="score", **PER_TOKEN)


def test_settings_that_contradict_data_weights_are_refused(tiny_dir, tmp_path):
    records = arithmetic_records(3, seed=4, form="prompt_completion")
    common = dict(sftkey=True, **PER_TOKEN)
    with pytest.raises(ValueError, match="no train record has that field"):
        trainer_for(tiny_dir, records, tmp_path, sftkey_example_weight_field="score", **common)
    with pytest.raises(ValueError, match=r"no assistant message .* has that field"):
        trainer_for(tiny_dir, records, tmp_path, sftkey_message_weight_field="loss", **common)
    with pytest.raises(ValueError, match="completion_only_loss=False contradicts itself"):
        trainer_for(tiny_dir, records, tmp_path, sftkey_prompt_weight=0.1, completion_only_loss=False, **common)
    messages = arithmetic_records(3, seed=4, form="messages")
    with pytest.raises(ValueError, match="needs assistant_only_loss=True"):
        trainer_for(tiny_dir, messages, tmp_path, sftkey_prompt_weight=0.1, **common)
    sharegpt = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "weight": 2.0}]}]
    with pytest.raises(ValueError, match=r"record 0: message 1 \(gpt\).*only assistant messages"):
        trainer_for(tiny_dir, sharegpt, tmp_path, **common)  # read after TRL's conversion, not left out
    text = arithmetic_records(3, seed=4, form="text")
    with pytest.raises(ValueError, match="a text record is trained whole"):
        trainer_for(tiny_dir, text, tmp_path, sftkey_prompt_weight=0.1, **common)
    if not PER_TOKEN:  # trl < 1.15 defaults to chunked_nll
        return
    with pytest.raises(ValueError, match="chunked_nll"):
        trainer_for(tiny_dir, records, tmp_path, sftkey_prompt_weight=0.1, sftkey=True, loss_type="chunked_nll")


def test_prompt_weight_setting_is_checked():
    for value in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sftkey_prompt_weight must be a finite number >= 0"):
            validate_sftkey_arguments(SFTKeyArguments(sftkey=True, sftkey_prompt_weight=value))
    with pytest.raises(ValueError, match="sftkey_example_weight_field must be a field name"):
        validate_sftkey_arguments(SFTKeyArguments(sftkey=True, sftkey_example_weight_field=" "))


def test_core_functions():
    options = DataWeightOptions(example_field="w")
    weights = record_weights(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}], "w": 0.5},
        options,
    )
    assert weights.messages == {1: 2.0} and weights.example_weight == 0.5
    # tokens starting at or before a content end belong to that message; after the last, to the last
    assert message_token_weights([0, 5, 10, 11, 30], [10, 20], [0.5, 3.0]) == [0.5, 0.5, 0.5, 3.0, 3.0]
    composed = compose_data_weights([7, 8, 9, 10], [-100, -100, 9, 10], [1.0, 1.0, 2.0, 2.0], 0.5, 0.2)
    assert composed["labels"] == [-100, 8, 9, 10]
    assert composed["sftkey_weight"] == [0.0, pytest.approx(0.1), 2.0, 2.0]
    assert composed["sftkey_prompt"] == [0, 1, 0, 0]
    assert compose_data_weights([7, 8], [-100, 8], [1.0, 1.0], 1.0, 0.0)["labels"] == [-100, 8]


def test_paths_that_cannot_weigh_refuse_data_weights(tiny_dir, tokenizer, tmp_path):
    """Pre-tokenised rows and SFTKeyCallback on a stock SFTTrainer no longer hold the prompt and the messages: data
    weights are refused there, never trained as 1."""
    from sftkey_plugin import SFTKeyCallback

    rows = [{"input_ids": tokenizer("a b c")["input_ids"], "score": 2.0}]
    with pytest.raises(ValueError, match="pre-tokenised rows no longer hold"):
        trainer_for(tiny_dir, rows, tmp_path, sftkey=True, sftkey_example_weight_field="score", **PER_TOKEN)
    callback = SFTKeyCallback(SFTKeyArguments(sftkey=True, sftkey_mode="weighted"))
    stock = trainer_for(tiny_dir, weighted_records(), tmp_path, trl.SFTTrainer, callbacks=[callback], **PER_TOKEN)
    with pytest.raises(ValueError, match="SFTKeyCallback cannot weigh tokens by the data"):
        stock.train()


def test_the_callback_on_packed_rows_warns_or_refuses_data_weights(tiny_dir, tmp_path, caplog):
    """Packed rows keep only the tokens, so SFTKeyCallback cannot see the messages' weights: it says they are not
    applied, and refuses a message weight field set by name."""
    from sftkey_plugin import SFTKeyCallback

    def stock(**arguments):
        callback = SFTKeyCallback(SFTKeyArguments(sftkey=True, sftkey_mode="weighted", **arguments))
        return trainer_for(
            tiny_dir, weighted_records(), tmp_path, trl.SFTTrainer, callbacks=[callback], packing=True, **PER_TOKEN
        )

    with pytest.raises(ValueError, match="SFTKeyCallback cannot weigh tokens by the data"):
        stock(sftkey_message_weight_field="score").train()
    with caplog.at_level(logging.WARNING, logger="sftkey_plugin"):
        stock().train()
    assert any("SFTKeyCallback does not apply data weights" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("turns", ["all", "last"])
def test_each_assistant_message_weighs_its_own_tokens(tiny_dir, tmp_path, turns):
    """Two assistant turns weighted 0.5 and 3.0 (assistant_only_loss): each turn's trained tokens (its end of turn
    included) carry its weight, whichever turns are marked for the key; the prompt weight goes to the rest."""
    from test_paths import CHATML_GENERATION

    record = {
        "messages": [
            {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "<think>2+3=5</think><answer>5</answer>", "weight": 0.5},
            {"role": "user", "content": "And 4+4?"},
            {"role": "assistant", "content": "<think>4+4=8</think><answer>8</answer>", "weight": 3.0},
        ]
    }
    trainer = built(
        tiny_dir, tmp_path, [record], sftkey_mode="weighted", sftkey_turns=turns, sftkey_prompt_weight=0.1,
        assistant_only_loss=True, chat_template=CHATML_GENERATION,
    )  # fmt: skip
    tokenizer = trainer.processing_class
    row = trainer.train_dataset[0]
    runs, start = [], None
    for index, prompt in enumerate([*row["sftkey_prompt"], 1]):
        if index and not prompt and start is None:
            start = index
        elif prompt and start is not None:
            runs.append((start, index))
            start = None
    assert len(runs) == 2
    assert [set(row["sftkey_weight"][a:b]) for a, b in runs] == [{0.5}, {3.0}]
    assert tokenizer.decode(row["input_ids"][runs[0][1] - 1]) == "<|im_end|>"
    prompt_weights = [w for w, p in zip(row["sftkey_weight"], row["sftkey_prompt"]) if p]
    assert prompt_weights == pytest.approx([0.1] * len(prompt_weights)) and row["sftkey_weight"][0] == 0
    key_turns = [bool(sum(row["sftkey_mask"][a:b])) for a, b in runs]
    assert key_turns == ([True, True] if turns == "all" else [False, True])


def test_evaluation_leaves_the_prompt_out_and_weighs_nothing(tiny_dir, tmp_path):
    """eval_loss with a prompt weight and message weights is the plain completion loss, as without them."""
    weights = dict(sftkey_prompt_weight=PROMPT, sftkey_example_weight_field="score")
    weighted = built(tiny_dir, tmp_path / "w", weighted_records(), evaluate=True, **weights).evaluate()
    plain = built(tiny_dir, tmp_path / "p", arithmetic_records(4, seed=5, form="prompt_completion"), evaluate=True)
    assert weighted["eval_loss"] == pytest.approx(plain.evaluate()["eval_loss"], rel=1e-6)
    assert "eval_sftkey/mean_weight" not in weighted


def built(tiny_dir, out, records, evaluate=False, chat_template=None, **settings):
    """An SFTKeyTrainer on ``records`` (also its evaluation data with ``evaluate``), with a chat template of its own."""
    from datasets import Dataset
    from test_trl import config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftkey_plugin import SFTKeyTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.chat_template = chat_template or tokenizer.chat_template
    return SFTKeyTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_dir),
        args=config(out, sftkey=True, **PER_TOKEN, **settings),
        train_dataset=Dataset.from_list(records),
        eval_dataset=Dataset.from_list(records) if evaluate else None,
        processing_class=tokenizer,
    )


def test_preview_shows_each_token_weight_and_the_counts(tiny_dir, tmp_path, capsys):
    import json

    from sftkey_plugin.cli.main import main

    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in weighted_records()))
    options = ["--example-weight-field", "score", "--prompt-weight", "0.1"]
    assert main(["preview", str(path), "--tokenizer", tiny_dir, "--json", *options]) == 0
    report = json.loads(capsys.readouterr().out)
    summary = report["summary"]
    assert summary["weighted_records"] == 4 and summary["zero_weight_tokens"] > 0
    first = report["examples"][0]
    assert len(first["weights"]) == first["tokens"] and first["weights"][0] == 0.0
    assert sorted(set(first["weights"][1:])) == pytest.approx([0.1 * 1.5, 0.5 * 1.5])
    assert main(["preview", str(path), "--tokenizer", tiny_dir, "-n", "1", *options]) == 0
    text = capsys.readouterr().out
    assert "records with a data weight" in text and "tokens at weight 0" in text
    assert "token weights: tokens 0: 0; 1-" in text
    path.write_text(json.dumps({**weighted_records()[0], "score": -1}) + "\n")
    assert main(["preview", str(path), "--tokenizer", tiny_dir, *options]) != 0
    assert "record 0: 'score' is negative" in capsys.readouterr().err


# a generation block that holds the tool calls and the newline after the end of turn
TOOL_GENERATION = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] or '' }}{% for call in message['tool_calls'] or [] %}"
    "{{ '<tool_call>' + call['function']['name'] + '</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% endgeneration %}{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TOOL_CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 4, "b": 4}}}


def tool_conversation() -> list[dict]:
    """An answer weighted 0.5, a tool call without text (no weight), its result, and an answer weighted 3.0."""
    return [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "<answer>5</answer>", "weight": 0.5},
        {"role": "user", "content": "And 4+4?"},
        {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": "8"},
        {"role": "assistant", "content": "<answer>8</answer>", "weight": 3.0},
    ]


def test_a_tool_call_and_the_text_after_an_answer_keep_their_own_message_weight(tiny_dir, tmp_path):
    """assistant_only_loss: a tool-call message's trained tokens weigh its own weight (1), not the next answer's, and
    the template's newline after an answer's end of turn (inside its generation block) weighs that answer's."""
    from sftkey_plugin.tokenize import trained_segments

    trainer = built(
        tiny_dir, tmp_path, [{"messages": tool_conversation()}], sftkey_mode="weighted", assistant_only_loss=True,
        chat_template=TOOL_GENERATION,
    )  # fmt: skip
    row = trainer.train_dataset[0]
    runs = trained_segments(row["labels"])
    assert [set(row["sftkey_weight"][a:b]) for a, b in runs] == [{0.5}, {1.0}, {3.0}]
    assert trainer.processing_class.decode(row["input_ids"][runs[0][1] - 1]) == "\n"


def test_message_weights_with_an_unplaced_tool_call_in_the_completion_are_refused(tokenizer):
    """A prompt/completion record places its answers by their content: a tool call without text in its completion
    would take the next answer's weight, so the record is refused, named."""
    from sftkey_plugin.tokenize import MarkingOptions, tokenize_with_key_mask

    messages = tool_conversation()
    del messages[1]["weight"]  # a weight in the prompt is refused on its own
    record = {"prompt": messages[:3], "completion": messages[3:]}
    with pytest.raises(ValueError, match=r"assistant message\(s\) \[3\] .*tool calls.*The record: \{'prompt'"):
        tokenize_with_key_mask(
            record, tokenizer, MarkingOptions(), chat_template=TOOL_GENERATION, weights=DataWeightOptions()
        )


def test_weights_on_some_messages_of_a_json_file_are_read(tiny_dir, tmp_path):
    """A JSON file in which only some messages carry a weight loads with free-form JSON features (the field is not
    declared, since other messages lack it): its records are read for weights, not taken to have none."""
    import json

    from datasets import load_dataset
    from test_trl import config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftkey_plugin import SFTKeyTrainer

    records = arithmetic_records(4, seed=2, form="prompt_completion")
    records[1]["completion"][0]["weight"] = 2.0
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    dataset = load_dataset("json", data_files=str(path), split="train")
    trainer = SFTKeyTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_dir),
        args=config(tmp_path / "out", sftkey=True, sftkey_mode="weighted", max_steps=1, **PER_TOKEN),
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(tiny_dir),
    )
    assert [set(row) - {0.0} for row in trainer.train_dataset["sftkey_weight"]] == [{1.0}, {2.0}, {1.0}, {1.0}]
