"""Weights from the data on Axolotl (message, example and prompt weights): the strategy's rows against a hand
derivation from Axolotl's own labels, one real ``axolotl train`` step (packed, accumulated) against the hand-computed
loss and gradients, the refusals, and the counts."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch

pytest.importorskip("axolotl")

from test_axolotl import LISTED, PLUGIN, SFTKEY_ON, _config, _strategy, _tokenize, axolotl_env, recorded_run, workdir
from test_trl import GRAD_RTOL, assert_gradients_close

from sftkey_plugin.examples import arithmetic_records
from sftkey_plugin.tokenize import trained_segments

pytestmark = pytest.mark.axolotl

__all__ = ["axolotl_env", "workdir"]  # the fixtures, used by name

KEY, OTHER, PROMPT = 2.0, 0.5, 0.1
DATA_WEIGHTS = {
    "sftkey_mode": "weighted",
    "sftkey_key_weight": KEY,
    "sftkey_other_weight": OTHER,
    "sftkey_prompt_weight": PROMPT,
    "sftkey_example_weight_field": "score",
}
# per record: the weights of its assistant messages (None: no weight field, so 1) and its example weight
MESSAGE_WEIGHTS = [[0.5, 2.0], [0.0], [None], [3.0], [None], [1.5], [None], [0.25]]
EXAMPLE_WEIGHTS = [1.5, None, 2.0, 0.25, None, 1.0, 3.0, None]


def weighted_records() -> list[dict]:
    """Eight chats, the first of two turns, with message and example weights, or neither."""
    records = arithmetic_records(9, seed=6, form="messages")
    records[0]["messages"] += records.pop()["messages"]
    for record, messages, example in zip(records, MESSAGE_WEIGHTS, EXAMPLE_WEIGHTS):
        answers = [m for m in record["messages"] if m["role"] == "assistant"]
        for message, weight in zip(answers, messages, strict=True):
            if weight is not None:
                message["weight"] = weight
        record["score"] = example  # None: absent (as a JSON loader fills a column some records lack)
    return records


def hand_weights(labels: list[int], messages: list[float | None], example: float | None) -> list[float]:
    """Each token's data weight, from Axolotl's own labels (one run of trained tokens per assistant message): the
    message weight times the example weight on each run, the prompt weight times it on every other token but the
    first."""
    example = 1.0 if example is None else example
    weights = [PROMPT * example] * len(labels)
    weights[0] = 0.0
    for (start, end), message in zip(trained_segments(labels), messages, strict=True):
        weights[start:end] = [(1.0 if message is None else message) * example] * (end - start)
    return weights


@pytest.fixture(scope="module")
def weighted_data(workdir) -> str:
    path = workdir["root"] / "weighted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in weighted_records()), encoding="utf-8")
    return str(path)


def _data_config(workdir, data: str, **overrides) -> dict:
    config = _config(workdir, "weights", {**SFTKEY_ON, **DATA_WEIGHTS, **overrides})
    config["datasets"] = [{"path": data, "ds_type": "json", "type": "chat_template"}]
    return config


def _plain_rows(axolotl_env, workdir, records) -> list[dict]:
    """The records tokenised by Axolotl's own chat_template strategy (SFTKey off)."""
    config = _config(workdir, "plain", {})
    return _tokenize(_strategy(axolotl_env, config)[2], copy.deepcopy(records))


def test_rows_carry_the_hand_derived_weights(axolotl_env, workdir, weighted_data):
    """Each row: Axolotl's trained tokens weigh message x example, every other token but the first gets its label
    back and weighs prompt x example (sftkey_prompt 1); the key mask is that of the row without data weights. Where
    Axolotl's tokens differ from the render, the runs of trained tokens carry the message weights."""
    records = weighted_records()
    plain = _plain_rows(axolotl_env, workdir, records)
    _, _, strategy = _strategy(axolotl_env, _data_config(workdir, weighted_data))
    rows = _tokenize(strategy, copy.deepcopy(records))
    _, _, unweighted = _strategy(axolotl_env, _config(workdir, "unweighted", SFTKEY_ON))
    for record, row, base, messages, example in zip(records, rows, plain, MESSAGE_WEIGHTS, EXAMPLE_WEIGHTS):
        assert row["input_ids"] == base["input_ids"]
        expected = hand_weights(base["labels"], messages, example)
        assert row["sftkey_weight"] == pytest.approx(expected)
        prompt = [int(i > 0 and label == -100) for i, label in enumerate(base["labels"])]
        assert row["sftkey_prompt"] == prompt
        assert row["labels"] == [t if p else label for t, label, p in zip(base["input_ids"], base["labels"], prompt)]
        assert row["sftkey_mask"] == _tokenize(unweighted, [copy.deepcopy(record)])[0]["sftkey_mask"]
    assert [row["sftkey_message_weights"] for row in rows] == [sum(w is not None for w in m) for m in MESSAGE_WEIGHTS]
    assert [row["sftkey_example_weighted"] for row in rows] == [int(e is not None) for e in EXAMPLE_WEIGHTS]

    # Axolotl's tokens and the render disagree (one more token): the runs of its trained tokens are the messages
    base, record = plain[0], records[0]
    ids, labels = [*base["input_ids"], strategy.tokenizer.eos_token_id], [*base["labels"], -100]
    fallback = strategy.key_mask(copy.deepcopy(record), ids, labels)
    trained = [i for i, label in enumerate(labels) if label != -100]
    assert [fallback["sftkey_weight"][i] for i in trained] == pytest.approx(
        [hand_weights(labels, MESSAGE_WEIGHTS[0], EXAMPLE_WEIGHTS[0])[i] for i in trained]
    )


def _leave_out_first_answer(how: str) -> dict:
    """The two-turn record with its first answer left out by the data (``training: false``, or one content part
    marked ``train: false``), that answer's weight removed."""
    record = copy.deepcopy(weighted_records()[0])
    answer = next(m for m in record["messages"] if m["role"] == "assistant")
    del answer["weight"]
    if how == "training":
        answer["training"] = False
    else:
        answer["content"] = [{"type": "text", "text": answer["content"], "train": False}]
    return record


@pytest.mark.parametrize("how", ["training", "training_detail"])
def test_the_prompt_weight_leaves_out_the_answers_the_data_leaves_out(axolotl_env, workdir, weighted_data, how):
    """An assistant turn that Axolotl's ``training: false`` / ``training_detail`` leaves out is not prompt: its
    untrained tokens stay at label -100 and weight 0. The prompt tokens are those Axolotl's role rule leaves out."""
    record = _leave_out_first_answer(how)
    as_roles = copy.deepcopy(record)
    for message in as_roles["messages"]:
        message.pop("training", None)
        if isinstance(message["content"], list):
            message["content"] = message["content"][0]["text"]
    plain, config = _config(workdir, "plain", {}), _data_config(workdir, weighted_data)
    for dataset in (*plain["datasets"], *config["datasets"]):
        dataset["message_field_training"] = "training"  # Axolotl reads no such field unless told
    base, roles = _tokenize(_strategy(axolotl_env, plain)[2], [record, as_roles])
    _, _, strategy = _strategy(axolotl_env, config)
    row = _tokenize(strategy, [copy.deepcopy(record)])[0]
    assert row["input_ids"] == base["input_ids"] == roles["input_ids"]
    left_out = [i for i, (a, b) in enumerate(zip(base["labels"], roles["labels"])) if a == -100 and b != -100]
    assert len(left_out) > 5
    assert row["sftkey_prompt"] == [int(i > 0 and label == -100) for i, label in enumerate(roles["labels"])]
    assert [row["labels"][i] for i in left_out] == [-100] * len(left_out)
    assert [row["sftkey_weight"][i] for i in left_out] == [0.0] * len(left_out)


def test_tokens_apart_from_the_render_pair_the_answers_axolotl_trains(axolotl_env, workdir):
    """Where Axolotl's tokens differ from the render, the answers paired with its trained runs are those of the turns
    it trains (``training: 0`` leaves a turn out, as Axolotl reads it): the answer kept apart from its reasoning is
    then found, not ``not_located``."""
    record = {
        "messages": [
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "reasoning_content": "2 + 3 = 5.", "content": "<Answer>5</Answer>", "training": 0},
            {"role": "user", "content": "And 5 - 1?"},
            {"role": "assistant", "reasoning_content": "5 - 1 = 4.", "content": "<Answer>4</Answer>"},
        ]
    }
    config = _config(workdir, "training_zero", SFTKEY_ON)
    config["datasets"][0]["message_field_training"] = "training"
    _, _, strategy = _strategy(axolotl_env, config)
    row = _tokenize(strategy, [copy.deepcopy(record)])[0]
    assert len(trained_segments(row["labels"])) == 1  # the first answer is left out
    ids, labels = [*row["input_ids"], strategy.tokenizer.eos_token_id], [*row["labels"], -100]
    marked = strategy.key_mask(copy.deepcopy(record), ids, labels)
    assert marked["sftkey_finder"] not in ("", "not_located") and 1 in marked["sftkey_mask"]


def test_weighed_messages_that_cannot_be_paired_with_the_turns_stop_the_run(axolotl_env, workdir, weighted_data):
    """Turns that do not pair up with the record's messages (a count off by more than the one system turn Axolotl
    adds or drops) cannot take the messages' weights: an error naming the record, not a silent weight 1."""
    _, _, strategy = _strategy(axolotl_env, _data_config(workdir, weighted_data))
    record = weighted_records()[0]
    turns = strategy.get_conversation_thread(record)[2:]
    with pytest.raises(ValueError, match="cannot be paired") as error:
        strategy._with_unread_fields(record, turns)
    assert record["messages"][-1]["content"].split("\n")[-1] in str(error.value)  # the record is shown
    for message in record["messages"]:  # no message weight: nothing is lost
        message.pop("weight", None)
    assert strategy._with_unread_fields(record, turns) == turns


def _record_with(change) -> dict:
    record = copy.deepcopy(weighted_records()[3])
    change(record)
    return record


def _set_message(index: int, value):  # type: ignore[no-untyped-def]
    return lambda record: record["messages"][index].__setitem__("weight", value)


BAD = [
    (_set_message(1, -1.0), "negative weights are not unlikelihood training"),
    (_set_message(1, math.nan), "weights must be finite"),
    (_set_message(1, math.inf), "weights must be finite"),
    (_set_message(1, "high"), "is not a number ('high')"),
    (_set_message(0, 2.0), "only assistant messages are trained"),
    (lambda record: record.__setitem__("score", -0.5), "'score' is negative"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_weights_stop_the_run_showing_the_record(axolotl_env, workdir, weighted_data, change, message):
    _, _, strategy = _strategy(axolotl_env, _data_config(workdir, weighted_data))
    record = _record_with(change)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        _tokenize(strategy, [record])
    assert record["messages"][0]["content"] in str(error.value)  # the record is shown


def test_a_weighed_message_the_template_alters_stops_the_run(axolotl_env, workdir, weighted_data):
    """A template that changes the content (upper case): the message's weight cannot be placed, which stops the run
    rather than training the message at 1."""
    from sftkey_plugin.tiny import CHATML

    template = {
        "chat_template": "jinja",
        "chat_template_jinja": CHATML.replace("message['content']", "message['content'] | upper"),
    }
    _, _, strategy = _strategy(axolotl_env, {**_data_config(workdir, weighted_data), **template})
    with pytest.raises(ValueError, match="altered the content of assistant message"):
        _tokenize(strategy, [weighted_records()[3]])
    assert _tokenize(strategy, [weighted_records()[2]])[0]["sftkey_weight"]  # no message weight: nothing to place


def _prepared(axolotl_env, workdir, config, records):
    """The records as Axolotl prepares them (this config's strategy), counted, refused or cleaned as the trainer does
    before the first step: ``(dataset, stats)``."""
    from datasets import Dataset

    from sftkey_plugin.axolotl.trainer import mark_count_and_apply_policy
    from sftkey_plugin.config import sftkey_arguments_from

    cfg, tokenizer, strategy = _strategy(axolotl_env, config)
    rows = _tokenize(strategy, copy.deepcopy(records))
    return mark_count_and_apply_policy(Dataset.from_list(rows), "train", tokenizer, sftkey_arguments_from(cfg), cfg)


def test_counts_and_data_weights_found_off(axolotl_env, workdir, weighted_data):
    """The counts go into the train-start line; without weights in the data (nor an example field or a prompt
    weight) the columns are removed, so the run trains on the rows of a run without data weights; a weight field set
    by name that no record has is an error."""
    records = weighted_records()
    dataset, stats = _prepared(axolotl_env, workdir, _data_config(workdir, weighted_data), records)
    assert {"sftkey_weight", "sftkey_prompt"} <= set(dataset.column_names)
    weights = [w for row in dataset for w, label in zip(row["sftkey_weight"], row["labels"]) if label != -100]
    line = stats.summary_line()
    assert f"data weights: 7 of 8 records weighted, mean token weight {sum(weights) / len(weights):.3g}" in line
    assert f"{weights.count(0.0)} tokens at weight 0" in line and weights.count(0.0) > 0

    unweighted = [{"messages": [{k: v for k, v in m.items() if k != "weight"} for m in r["messages"]]} for r in records]
    off = _config(workdir, "off", SFTKEY_ON)
    dataset, stats = _prepared(axolotl_env, workdir, off, unweighted)
    assert (
        not {"sftkey_weight", "sftkey_prompt"} & set(dataset.column_names)
        and "data weights" not in stats.summary_line()
    )
    with pytest.raises(ValueError, match="sftkey_example_weight_field='score', but no train record has that field"):
        _prepared(axolotl_env, workdir, {**off, "sftkey_example_weight_field": "score"}, unweighted)
    with pytest.raises(ValueError, match="sftkey_message_weight_field='loss_weight', but no assistant message"):
        _prepared(axolotl_env, workdir, {**off, "sftkey_message_weight_field": "loss_weight"}, unweighted)


def test_other_dataset_types_take_the_prompt_weight(axolotl_env, workdir):
    """Rows of another type (alpaca), marked by the trainer from their own tokens: every token their labels leave
    out but the first weighs the prompt weight, the trained ones 1."""
    from axolotl.loaders import load_tokenizer
    from axolotl.utils.data.wrappers import get_dataset_wrapper
    from datasets import Dataset

    from sftkey_plugin.axolotl.trainer import mark_count_and_apply_policy
    from sftkey_plugin.config import sftkey_arguments_from

    # weighted 1.0 / 1.0: plain SFT with the prompt weight, which needs no key span (these rows have none)
    overrides = {**SFTKEY_ON, "sftkey_mode": "weighted", "sftkey_prompt_weight": PROMPT, "datasets": "ALPACA"}
    config = _config(workdir, "alpaca_prompt", overrides)
    cfg = axolotl_env(config)
    tokenizer = load_tokenizer(cfg)
    records = Dataset.from_list(
        [{"instruction": f"What is {n} + 1?", "input": "", "output": f"{n + 1}"} for n in range(3)]
    )
    plain, _ = get_dataset_wrapper(
        dataset_config=cfg.datasets[0], tokenizer=tokenizer, cfg=cfg, dataset_base_type="alpaca", dataset=records
    )
    dataset, stats = mark_count_and_apply_policy(plain, "train", tokenizer, sftkey_arguments_from(cfg), cfg)
    for row, base in zip(dataset, plain):
        prompt = [int(i > 0 and label == -100) for i, label in enumerate(base["labels"])]
        assert prompt.count(1) > 10 and row["sftkey_prompt"] == prompt
        assert row["sftkey_weight"] == pytest.approx([PROMPT if p else float(i > 0) for i, p in enumerate(prompt)])
        assert row["labels"] == [t if p else label for t, label, p in zip(base["input_ids"], base["labels"], prompt)]
    assert "data weights: 0 of 3 records weighted" in stats.summary_line()


REFUSED = [
    ({"train_on_inputs": True}, "train_on_inputs: true and sftkey_prompt_weight: 0.1"),
    ({"datasets": "ALPACA"}, "sftkey_example_weight_field and a dataset of type alpaca"),
]


@pytest.mark.parametrize(("overrides", "message"), REFUSED, ids=[m for _, m in REFUSED])
def test_settings_that_contradict_data_weights_are_refused(axolotl_env, workdir, overrides, message):
    config = _config(workdir, "refused", {**SFTKEY_ON, **DATA_WEIGHTS, **overrides})
    with pytest.raises(Exception, match="SFTKey \\(sftkey: true\\) cannot be used with") as error:
        axolotl_env(config)
    assert message in str(error.value)


def test_fused_loss_is_refused_with_data_weights(axolotl_env, workdir, weighted_data):
    """As ``weighted`` with weights other than 0 and 1: a fused loss has no per-token losses to weigh, so a prompt
    weight (even 1) or a weight field is refused by the config, and message weights found in the data (the default
    field) before the first step. Registers the Liger plugin in Axolotl's plugin singleton."""
    config = {**_data_config(workdir, weighted_data), "plugins": [PLUGIN, "axolotl.integrations.liger.LigerPlugin"]}
    config.update(liger_fused_linear_cross_entropy=True, sftkey_mode="two_stage")  # a mode the fused loss keeps
    for name in ("sftkey_key_weight", "sftkey_other_weight"):
        del config[name]
    for settings, setting in [
        ({"sftkey_prompt_weight": 1.0, "sftkey_example_weight_field": None}, "sftkey_prompt_weight: 1.0"),
        ({"sftkey_prompt_weight": 0.5, "sftkey_example_weight_field": None}, "sftkey_prompt_weight: 0.5"),
        ({"sftkey_prompt_weight": 0}, "sftkey_example_weight_field: score"),
    ]:
        with pytest.raises(Exception, match=f"liger_fused_linear_cross_entropy: true and {setting}"):
            axolotl_env({**config, **settings})
    # the mode's weights: the advice keeps no prompt weight (any prompt weight above 0 is refused above)
    mode = {"sftkey_prompt_weight": 0, "sftkey_example_weight_field": None, "sftkey_mode": "weighted"}
    with pytest.raises(Exception, match="true in sftkey_mode: weighted") as error:
        axolotl_env({**config, **mode, "sftkey_key_weight": 3.0})
    assert "sftkey_prompt_weight" not in str(error.value)
    only_messages = {k: v for k, v in config.items() if k not in DATA_WEIGHTS}
    with pytest.raises(ValueError, match="liger_fused_linear_cross_entropy: true returns only a total"):
        _prepared(axolotl_env, workdir, only_messages, weighted_records())


def test_packed_accumulated_step_equals_the_hand_computation(axolotl_env, workdir, weighted_data, tiny_dir, tokenizer):
    """One optimizer step of ``axolotl train`` (sample packing, 2 accumulated bins) over chats with message, example
    and prompt weights in weighted mode (key 2.0 / other 0.5): the loss and gradients are ``sum(w * nll) / n``
    computed here from the records, ``w`` the hand-derived data weight times KEY or OTHER on completion tokens (the
    trained tokens of Axolotl's own labels; key tokens from the batch's key mask, checked elsewhere), ``n`` the
    tokens of weight != 0, each record's NLL from its own forward."""
    from transformers import AutoModelForCausalLM

    overrides = {
        **DATA_WEIGHTS,
        "datasets": [{"path": weighted_data, "ds_type": "json", "type": "chat_template"}],
        "plugins": ["axolotl_recorder.BatchRecorder", *LISTED],
        "sample_packing": True,
        "pad_to_sequence_len": True,
        "sequence_len": 256,
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 2,
        "max_steps": 1,
    }
    record = recorded_run(workdir, "data_weights_packed", overrides)
    records = weighted_records()
    plain = {tuple(r["input_ids"]): (r["labels"], i) for i, r in enumerate(_plain_rows(axolotl_env, workdir, records))}
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    total, count, seen = 0.0, 0, []
    assert len(record["batches"]) == 2
    for batch in record["batches"]:
        ids, positions, key_mask = batch["input_ids"][0], batch["position_ids"][0], batch["sftkey_mask"][0]
        starts = (positions == 0).nonzero().flatten().tolist()
        placed = 0
        for start in starts:
            match = next(((k, v) for k, v in plain.items() if ids[start : start + len(k)].tolist() == list(k)), None)
            if match is None:
                continue  # the padding after the last row
            row_ids, (labels, index) = match
            seen.append(index)
            placed += len(row_ids)
            weights = hand_weights(labels, MESSAGE_WEIGHTS[index], EXAMPLE_WEIGHTS[index])
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([row_ids])).logits[0, :-1].float(), dim=-1)
            for t in range(1, len(row_ids)):
                mode = 1.0 if labels[t] == -100 else KEY if key_mask[start + t] else OTHER
                w = weights[t] * mode
                if w != 0:
                    total = total + w * -log_probs[t - 1, row_ids[t]]
                    count += 1
        # every packed token belongs to a record, but the padding after the last one
        assert ids[placed:].eq(tokenizer.pad_token_id).all() and batch["labels"][0][placed:].eq(-100).all()
    expected = total / count
    expected.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    print(f"\nAxolotl packed data-weight step: records {seen}, loss {record['logs'][0]['loss']:.6f}")
    assert len(seen) == len(set(seen)) >= 3 and 0 in seen  # the two-turn record is in the step
    assert record["logs"][0]["loss"] == pytest.approx(float(expected.detach()), rel=GRAD_RTOL)
    assert "sftkey/mean_weight" in record["logs"][0]
    assert_gradients_close(record["grads"][0], grads)


def test_preview_shows_the_counts_and_each_tokens_weight(workdir, weighted_data):
    """``axolotl sftkey-preview``: the data-weight counts in the summary, and each token's weight where it changes
    (the first record: prompt 0.1 x 1.5, its answers 0.5 x 1.5 and 2.0 x 1.5)."""
    from axolotl.cli.main import cli
    from axolotl.cli.plugins import PluginCommand
    from click.testing import CliRunner
    from test_axolotl import _write, fresh_axolotl_plugins

    cli.plugin_commands().setdefault(
        "sftkey-preview", PluginCommand(target="sftkey_plugin.axolotl.preview:sftkey_preview")
    )
    path = _write(
        workdir["root"] / "preview_weights.yml", {**_data_config(workdir, weighted_data), "plugins": [PLUGIN]}
    )
    fresh_axolotl_plugins()
    result = CliRunner().invoke(cli, ["sftkey-preview", str(path), "-n", "1", "--no-color"])
    assert result.exit_code == 0, result.output
    assert "data weights: 7 of 8 records weighted" in result.output
    example = result.output.split("--- example 1:")[1]
    assert example.index("<x0.15>") < example.index("<x0.75>") < example.index("<x3>")
    assert "<x0>" not in example.split("<x0.15>")[1]  # after the first token, nothing of the row is untrained


def test_weight_settings_change_the_cache_folder(axolotl_env, workdir, weighted_data):
    """The rows carry the composed weights: another prompt weight or weight field is another prepared dataset."""
    config = _data_config(workdir, weighted_data)
    folders = {
        str(axolotl_env({**config, **change}).dataset_prepared_path)
        for change in ({}, {"sftkey_prompt_weight": 0.2}, {"sftkey_example_weight_field": "other"},
                       {"sftkey_message_weight_field": "w"})
    }  # fmt: skip
    assert len(folders) == 4
