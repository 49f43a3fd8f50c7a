"""The ``sftkey`` command: preview counts, convert round trips, eval extraction/metrics/--compare, the demo pipeline."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from sftkey_plugin.cli.answers import answers_match, extract_answer, format_ok, normalize_answer
from sftkey_plugin.cli.data import load_records, save_records
from sftkey_plugin.cli.evaluate import (
    compare_results,
    gold_answer,
    mcnemar_exact,
    paired_bootstrap,
    score_outputs,
    summarise,
)
from sftkey_plugin.cli.main import main
from sftkey_plugin.config import SFTKeyArguments, validate_sftkey_arguments
from sftkey_plugin.examples import arithmetic_records, tagged_response
from sftkey_plugin.finders import match_key_spans


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def run_json(capsys, argv):
    """Run the CLI with --json; returns (exit status, parsed stdout)."""
    status = main([*argv, "--json"])
    return status, json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------ help


@pytest.mark.parametrize("command", ["preview", "convert", "eval", "demo"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--json" in text and len(text) > 500


def test_no_command_prints_usage(capsys):
    assert main([]) == 2
    assert "sftkey demo" in capsys.readouterr().out


# ------------------------------------------------------------------ answers

NORMALISED = [
    ("1,000", "1000"),
    ("$5", "5"),
    ("0.50", "1/2"),
    (".5", "1/2"),
    ("1/2", "1/2"),
    ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),  # LaTeX stays LaTeX: math-verify decides its equality
    ("5.0", "5"),
    ("−3", "-3"),
    ("50%", "50"),
    ("12 apples", "12"),
    ("x = 5", "5"),
    ("(B)", "B"),
    ("B.", "B"),
    ("(b)", "B"),
    ("(C) 42", "C"),
    ("The answer is (D).", "D"),
    ("#### 1,234", "1234"),
    ("<Answer>42</Answer>", "42"),
    ("\n<Answer>$1,000.00</Answer>", "1000"),
    ("Final Answer: The final answer is $7$. I hope it is correct.", "7"),
    ("  Paris ", "paris"),
    ("1,2", "1,2"),
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), NORMALISED)
def test_normalize_answer_golden(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("prediction", "gold", "same"),
    [
        ("1,000", "1000", True),
        ("$5", "5", True),
        ("0.50", "1/2", True),
        ("(B)", "B", True),
        ("12", "13", False),
        (None, "1", False),
        ("B", "C", False),
        ("1/3", "0.33", False),
        ("(b)", "B", True),  # an option letter, as its own rule reads it
        ("2", "B", False),  # never a number
        ("Even", "even", True),
        ("odd", "even", False),
        ("neve", "even", False),  # words stay words (math-verify would read both as e*e*n*v)
        # decided by math-verify; the hand-written LaTeX rules it replaces said False for these three
        ("\\frac{\\sqrt2}{2}", "\\sqrt{2}/2", True),
        ("0.1", "10\\%", True),
        ("\\{2, 1\\}", "\\{1,2\\}", True),
        # and agreed on these
        ("0.5", "\\frac{1}{2}", True),
        ("\\$5.00", "5", True),
        ("\\boxed{\\dfrac12}", "0.5", True),
        ("\\sqrt{3}/2", "\\frac{\\sqrt2}{2}", False),
        ("(1,2]", "[1,2]", False),
    ],
)
def test_answers_match(prediction, gold, same):
    assert answers_match(prediction, gold) is same


@pytest.mark.parametrize(
    ("output", "finder", "answer"),
    [
        ("<Thinking>2 + 2 = 4.</Thinking>\n<Answer>4</Answer>", "tags", "4"),
        ("<Thinking>a</Thinking>\n<Answer>The answer is \\boxed{7}</Answer>", "tags", "7"),
        ("so it is 3 + 4 = 7\n#### 7", "gsm8k", "7"),
        ("We find $\\boxed{\\frac{1}{2}}$.", "boxed", "\\frac{1}{2}"),
        ("<think>hmm</think>The answer is 12.", "think", "12"),
        ("Reasoning... So the answer is (B).", "answer_is", "(B)"),
        ("no answer at all", None, None),
    ],
)
def test_extract_answer_uses_the_training_finders(output, finder, answer):
    extraction = extract_answer(output)
    assert (extraction.finder, extraction.answer) == (finder, answer)


def test_format_accuracy_is_the_strict_tag_structure():
    assert format_ok("<Thinking>1 + 1 = 2.</Thinking>\n<Answer>2</Answer>")
    assert format_ok("  <Thinking>x</Thinking><Answer>2</Answer>\n")
    assert not format_ok("<Thinking>x</Thinking>\n<Answer> </Answer>")  # blank answer
    assert not format_ok("<Thinking>x</Thinking>\n<Answer>2</Answer> and more")
    assert not format_ok("<Thinking>x<Thinking>y</Thinking>\n<Answer>2</Answer>")
    assert not format_ok("<Answer>2</Answer>")
    assert format_ok("<think>a</think>b", pattern=r"<think>(?P<r>.*)</think>(?P<a>.*)")


# ------------------------------------------------------------------ eval metrics on fixed outputs


def test_metrics_on_fixed_outputs():
    outputs = [
        "<Thinking>1 + 2 = 3.</Thinking>\n<Answer>3</Answer>",  # right, formatted
        "<Thinking>2 + 2 = 5.</Thinking>\n<Answer>5</Answer>",  # wrong, formatted
        "<Thinking>10 * 100 = 1000.</Thinking>\n<Answer>1,000</Answer>",  # right after normalisation
        "the answer is 7.",  # right, not formatted
        "I cannot say",  # nothing extracted
        "<Thinking>x</Thinking>\n<Answer>4</Answer>",  # formatted, no gold: not graded
    ]
    golds = ["3", "4", "1000", "7", "2", None]
    rows = score_outputs(outputs, golds)
    assert [r["correct"] for r in rows] == [True, False, True, True, False, None]
    assert [r["format_ok"] for r in rows] == [True, True, True, False, False, True]
    summary = summarise(rows)
    assert summary["graded"] == 5 and summary["correct"] == 3
    assert summary["accuracy"] == pytest.approx(0.6)
    assert summary["format_accuracy"] == pytest.approx(4 / 6)
    assert summary["score"] == pytest.approx(0.7 * 0.6 + 0.3 * 4 / 6)
    assert summary["extracted"] == 5 and summary["by_finder"]["tags"] == 4


def test_gold_answer_from_field_or_reference():
    record = arithmetic_records(1, seed=3)[0]
    assert gold_answer(record, "answer") == record["answer"]
    without_field = {"messages": record["messages"]}
    assert gold_answer(without_field, "answer") == record["answer"]
    gsm = {"prompt": "Q", "completion": "2 + 2 = 4\n#### 4"}
    assert gold_answer(gsm, "answer") == "4"


# ------------------------------------------------------------------ --compare


def _results(correct, formatted):
    return [
        {"index": i, "prompt": f"q{i}", "correct": c, "format_ok": f}
        for i, (c, f) in enumerate(zip(correct, formatted))
    ]


def test_compare_two_fixed_result_files(tmp_path, capsys):
    # 10 right in both, 4 wrong in both, 15 only B right, 1 only A right
    a = [True] * 10 + [False] * 4 + [False] * 15 + [True]
    b = [True] * 10 + [False] * 4 + [True] * 15 + [False]
    path_a = write_jsonl(tmp_path / "a.jsonl", _results(a, [True] * 30))
    path_b = write_jsonl(tmp_path / "b.jsonl", _results(b, [True] * 29 + [False]))
    status, result = run_json(capsys, ["eval", "--compare", path_a, path_b, "--resamples", "2000"])
    assert status == 0
    assert result["paired"] == result["graded"] == 30
    assert result["accuracy"]["a"] == pytest.approx(11 / 30)
    assert result["accuracy"]["b"] == pytest.approx(25 / 30)
    assert result["accuracy"]["difference"] == pytest.approx(14 / 30)
    low, high = result["accuracy"]["ci"]
    assert 0 < low < 14 / 30 < high <= 1
    assert (result["b_right_a_wrong"], result["a_right_b_wrong"]) == (15, 1)
    assert result["mcnemar_p"] == pytest.approx(mcnemar_exact(1, 15)) and result["mcnemar_p"] < 0.001
    assert result["format_accuracy"]["difference"] == pytest.approx(-1 / 30)

    assert main(["eval", "--compare", path_a, path_b]) == 0
    text = capsys.readouterr().out
    assert "A: a" in text and "B: b" in text and "CI" in text and "excludes 0 (B is better)" in text

    # 3 against 2 discordant pairs: noise, and the report says so
    path_c = write_jsonl(tmp_path / "c.jsonl", _results([True] * 3 + [False] * 2, [True] * 5))
    path_d = write_jsonl(tmp_path / "d.jsonl", _results([False] * 3 + [True] * 2, [True] * 5))
    assert main(["eval", "--compare", path_c, path_d]) == 0
    assert "within noise" in capsys.readouterr().out


def test_compare_refuses_different_evaluation_sets(tmp_path, capsys):
    path_a = write_jsonl(tmp_path / "a.jsonl", _results([True], [True]))
    other = _results([True], [True])
    other[0]["prompt"] = "another question"
    path_b = write_jsonl(tmp_path / "b.jsonl", other)
    assert main(["eval", "--compare", path_a, path_b]) == 2
    assert "not the same evaluation set" in capsys.readouterr().err


def test_bootstrap_and_mcnemar_edges():
    assert paired_bootstrap([1, 0, 1], [1, 0, 1]) == (0.0, 0.0, 0.0)
    assert paired_bootstrap([0] * 5, [1] * 5)[1:] == (1.0, 1.0)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)
    assert compare_results(_results([True, False], [True, True]), _results([True, True], [True, True]))["paired"] == 2


# ------------------------------------------------------------------ preview


@pytest.fixture
def preview_data(tmp_path):
    records = arithmetic_records(4, seed=1)  # 4 tagged answers
    records[1]["messages"][1]["content"] = "I do not know."  # no answer
    long_reasoning = "Let me think again. " * 40
    records[2]["messages"][1]["content"] = tagged_response(long_reasoning, "7")  # answer cut at max_length
    records.append({"prompt": "Q: 2 + 2?\nA: ", "completion": "2 + 2 = 4.\n#### 4"})  # gsm8k, text form
    records.append({"messages": [{"role": "user", "content": "hi"}]})  # cannot be tokenised: no assistant turn
    return write_jsonl(tmp_path / "data.jsonl", records)


def test_preview_counts(tiny_dir, preview_data, capsys):
    status, report = run_json(
        capsys, ["preview", preview_data, "--tokenizer", tiny_dir, "--max-length", "96", "-n", "5"]
    )
    assert status == 0
    summary = report["summary"]
    assert summary["examples"] == 5 and summary["errors"] == 1
    assert summary["found"] == 4 and summary["missing"] == 1 and summary["cut"] == 1
    assert summary["complete"] == 3 and summary["complete_share"] == pytest.approx(0.6)
    tags = summary["by_finder"]["tags"]
    assert (tags["examples"], tags["complete"], tags["cut"]) == (3, 2, 1)
    assert summary["by_finder"]["gsm8k"]["examples"] == 1 and summary["by_finder"]["(none)"]["examples"] == 1
    shown = {e["index"]: e for e in report["examples"]}
    assert shown[0]["status"] == "found" and shown[0]["key_text"].startswith("\n<Answer>")
    assert shown[0]["key_text"].rstrip().endswith("</Answer><|im_end|>")
    assert shown[1]["status"] == "missing" and shown[1]["key_tokens"] == 0
    assert shown[2]["status"] == "cut" and shown[2]["tokens"] > 96
    assert shown[4]["key_text"] == "#### 4<|im_end|>"
    assert all(len(e["token_texts"]) == len(e["key_mask"]) == e["tokens"] for e in report["examples"])


def test_preview_min_found_gate_and_rendering(tiny_dir, preview_data, capsys):
    assert main(["preview", preview_data, "--tokenizer", tiny_dir, "--max-length", "96", "--min-found", "0.95"]) == 1
    captured = capsys.readouterr()
    assert "--min-found 0.95" in captured.err
    text = captured.out
    assert "with a key span" in text and "finder" in text and "gsm8k" in text
    assert "[[" in text and "]]" in text  # key tokens bracketed when not a terminal
    assert "·" in text and "✂" in text
    assert main(["preview", preview_data, "--tokenizer", tiny_dir, "--min-found", "0.5", "-n", "0"]) == 0


def test_preview_reads_parquet_and_datasets_folders(tiny_dir, tmp_path, capsys):
    records = arithmetic_records(3, seed=2, form="prompt_completion")
    for target in (tmp_path / "data.parquet", tmp_path / "saved"):
        save_records(records, target)
        assert load_records(target) == records
        status, report = run_json(capsys, ["preview", str(target), "--tokenizer", tiny_dir, "-n", "1"])
        assert status == 0 and report["summary"]["complete"] == 3
        # prompt/completion: only the completion is trained, and the key is inside it
        example = report["examples"][0]
        assert all(t for k, t in zip(example["key_mask"], example["trained_mask"]) if k)
        assert 0 in example["trained_mask"]


# ------------------------------------------------------------------ convert


def _assistant_text(record):
    if "messages" in record:
        return record["messages"][-1]["content"]
    completion = record["completion"]
    return completion if isinstance(completion, str) else completion[-1]["content"]


CONVERTIBLE = {
    "gsm8k": [
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "3 + 4 = <<3+4=7>>7\n#### 7"},
                ]
            },
            "7",
        ),
        ({"prompt": "Q: ", "completion": "It costs 1,000.\n#### 1,000"}, "1,000"),
    ],
    "boxed": [
        (
            {
                "prompt": [{"role": "user", "content": "q"}],
                "completion": [{"role": "assistant", "content": "So $x = \\boxed{\\frac{1}{2}}$."}],
            },
            "\\frac{1}{2}",
        ),
    ],
    "answer_is": [({"prompt": "Q: ", "completion": "Option B fits. The answer is (B)."}, "(B)")],
    "think": [
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "<think>2 + 2 is 4</think>\n\n4 apples"},
                ]
            },
            "4 apples",
        ),
    ],
    "field": [({"prompt": "Q: ", "completion": "Because water boils at 100 C.", "label": "100"}, "100")],
}


@pytest.mark.parametrize("source", sorted(CONVERTIBLE))
def test_convert_round_trip(source, tmp_path, capsys):
    cases = CONVERTIBLE[source]
    rejected = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no marker here"}]},
        {"text": "a text record"},
    ]
    path = write_jsonl(tmp_path / "in.jsonl", [record for record, _ in cases] + rejected)
    out = tmp_path / "out.jsonl"
    extra = ["--answer-field", "label"] if source == "field" else []
    status, report = run_json(capsys, ["convert", path, str(out), "--from", source, *extra])
    assert status == 0
    assert report["converted"] == len(cases) and report["rejected"] == len(rejected)
    converted = load_records(out)
    for (original, answer), record in zip(cases, converted):
        assert set(record) >= set(original)  # same form, other fields kept
        text = _assistant_text(record)
        assert format_ok(text)
        finder, spans = match_key_spans(text, "tags")
        assert finder == "tags" and text[spans[0][0] : spans[0][1]] == f"\n<Answer>{answer}</Answer>"
    rejects = load_records(report["rejects_file"])
    assert len(rejects) == report["rejected"] and all(r["reason"] and "record" in r for r in rejects)


def test_convert_raw_gsm8k_fields_and_already_tagged(tmp_path, capsys):
    raw = [
        {"question": "Tom has 3 and buys 2. How many?", "answer": "3 + 2 = <<3+2=5>>5\n#### 5", "id": 1},
        {"question": "Unanswered", "answer": "no marker", "id": 2},
    ]
    path = write_jsonl(tmp_path / "gsm.jsonl", raw)
    out = tmp_path / "gsm_out.jsonl"
    status, report = run_json(
        capsys,
        [
            "convert",
            path,
            str(out),
            "--from",
            "gsm8k",
            "--prompt-field",
            "question",
            "--response-field",
            "answer",
        ],
    )
    assert status == 0 and (report["converted"], report["rejected"]) == (1, 1)
    [record] = load_records(out)
    assert record["messages"][0] == {"role": "user", "content": raw[0]["question"]}
    assert record["messages"][1]["content"] == "<Thinking>3 + 2 = <<3+2=5>>5</Thinking>\n<Answer>5</Answer>"
    assert record["answer"] == "5" and record["id"] == 1
    assert load_records(tmp_path / "gsm_out.rejects.jsonl")[0]["reason"] == "no key span found by the gsm8k finder"

    # converting the output again leaves it unchanged
    status, again = run_json(capsys, ["convert", str(out), str(tmp_path / "again.jsonl"), "--from", "gsm8k"])
    assert (again["already_tagged"], again["rejected"]) == (1, 0)
    assert load_records(tmp_path / "again.jsonl") == [record]


def test_convert_rejects_trailing_text_unless_allowed(tmp_path, capsys):
    record = {"prompt": "Q", "completion": "So the answer is $7$. I hope it is correct. Really."}
    path = write_jsonl(tmp_path / "in.jsonl", [record])
    _, report = run_json(capsys, ["convert", path, str(tmp_path / "o.jsonl"), "--from", "answer_is"])
    assert report["reject_reasons"] == {"text after the answer": 1}
    _, report = run_json(
        capsys, ["convert", path, str(tmp_path / "o.jsonl"), "--from", "answer_is", "--allow-trailing"]
    )
    assert report["converted"] == 1
    assert load_records(tmp_path / "o.jsonl")[0]["completion"].endswith("<Answer>7</Answer>")


# ------------------------------------------------------------------ eval on a model


def test_eval_writes_results_and_summary(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "test.jsonl", arithmetic_records(5, seed=4, form="prompt_completion"))
    output = tmp_path / "res" / "tiny.jsonl"
    status, summary = run_json(
        capsys,
        [
            "eval",
            tiny_dir,
            data,
            "-o",
            str(output),
            "--max-new-tokens",
            "6",
            "--batch-size",
            "2",
            "--threads",
            "1",
        ],
    )
    assert status == 0
    assert summary["examples"] == summary["graded"] == 5 and summary["generated_tokens"] <= 30
    rows = load_records(output)
    assert [r["index"] for r in rows] == list(range(5))
    assert rows[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert [r["gold"] for r in rows] == [r["answer"] for r in load_records(data)]
    assert json.loads((tmp_path / "res" / "tiny.summary.json").read_text())["accuracy"] == summary["accuracy"]


def test_eval_generation_is_batched_with_left_padding(tiny_dir):
    """A prompt's greedy output must not depend on the other prompts in its batch (left padding, attention mask)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftkey_plugin.cli.evaluate import generate, render_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    torch.set_num_threads(1)
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}])[0] for q in ("What is 1 + 2?", "Hi")]
    together, _ = generate(model, tokenizer, prompts, batch_size=2, max_new_tokens=5, progress=False)
    alone = [generate(model, tokenizer, [p], batch_size=1, max_new_tokens=5, progress=False)[0][0] for p in prompts]
    assert together == alone


# ------------------------------------------------------------------ demo


def test_demo_splits_hold_out_test_questions():
    from sftkey_plugin.cli.demo import make_splits

    for task in ("arithmetic", "choice", "parity"):
        train, test = make_splits(task, 300, 50, terms=2, digits=2, seed=0)
        train_questions = {r["prompt"][0]["content"].split("?")[0] for r in train}
        assert len(train) == 300 and len(test) == 50
        assert not any(r["prompt"][0]["content"].split("?")[0] in train_questions for r in test)
        record = test[0]
        assert format_ok(record["completion"][0]["content"]) and record["answer"]
    with pytest.raises(Exception, match="distinct questions"):
        make_splits("arithmetic", 500, 10, terms=2, digits=1, seed=0)
    _, parity = make_splits("parity", 10, 40, terms=3, digits=2, seed=1)
    assert {r["answer"] for r in parity} == {"even", "odd"}  # both occur, each the value's parity, never the value
    assert all(r["answer"] == ("even", "odd")[int(r["value"]) % 2] for r in parity)
    assert all(r["prompt"][0]["content"].endswith("even or odd?") for r in parity)


def test_demo_pipeline_small(tmp_path):
    """The demo is `sftkey ab` on the generated task, as a command: its data, tiny model and TRL config, then ab's
    units (one per arm, side by side on the CPU; two arms, to keep it cheap) and ab's report; with --json its stdout
    is that report alone, whatever the units and the libraries print; it draws report.png by default wherever
    matplotlib is installed (the README's first command installs it)."""
    import yaml

    out = tmp_path / "demo"
    command = "from sftkey_plugin.cli.main import main; raise SystemExit(main())"
    arguments = ["--quick", "--steps", "4", "--arms", "sft_equal,weighted_x2", "--output-dir", str(out), "--json"]
    done = subprocess.run(
        [sys.executable, "-c", command, "demo", *arguments], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["max_steps"] == 4 and report["test_size"] == 16 and report["seeds"] == [0]
    arms = ["sft_equal", "weighted_x2"]
    assert list(report["arms"]) == arms and report["baseline"] == "sft_equal"
    assert report["arms"]["weighted_x2"] == {"sftkey": True, "sftkey_mode": "weighted", "sftkey_key_weight": 2.0}
    # ab's plan on the demo's own files: its TRL config (the tiny model in init/, train.jsonl) and test set
    plan = json.loads((out / "plan.json").read_text())
    assert (plan["config"], plan["eval"]) == (str(out / "config.yaml"), str(out / "test.jsonl"))
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model_name_or_path"] == str(out / "init") and config["dataset_name"] == str(out / "train.jsonl")
    assert config["loss_type"] == "nll" and config["max_steps"] == 4
    for arm in arms:
        unit = out / "runs" / f"{arm}-seed0"
        assert 0.0 <= report["scores"][arm]["accuracy"]["0"] <= 1.0
        assert len(load_records(unit / "eval.jsonl")) == 16 and (unit / "model" / "config.json").exists()
        assert json.loads((unit / "trained.json").read_text())["steps"] == 4
        # deepspeed (installed here as a test dependency) is told it runs on the CPU, so it prints no warning
        assert "Setting accelerator to CPU" not in (unit / "train.log").read_text()
    # each unit trained its arm: plain SFT logs nothing of SFTKey's, weighted_x2 its key weight at every step
    logged = {arm: json.loads((out / "runs" / f"{arm}-seed0/trained.json").read_text())["log_history"] for arm in arms}
    assert not any(key.startswith("sftkey/") for entry in logged["sft_equal"] for key in entry)
    assert [entry["sftkey/key_weight"] for entry in logged["weighted_x2"] if "loss" in entry] == [2.0] * 4
    assert [(arm, c["per_seed"][0]["paired"]) for arm, c in report["comparisons"].items()] == [("weighted_x2", 16)]
    assert json.loads((out / "report.json").read_text())["comparisons"] == report["comparisons"]
    if importlib.util.find_spec("matplotlib") is None:
        assert report["plot"] is None
    else:
        assert report["plot"] == str(out / "report.png")
        assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    progress = done.stderr  # with --json the progress and ab's report go to stderr
    assert "[3/3] sftkey ab: 2 arm(s) x 1 seed(s), 4 optimizer steps each, 2 side by side" in progress
    assert "weighted_x2: SFTKey weighted (key x2)" in progress
    # side by side: every unit starts before the first one is done
    lines = progress.splitlines()
    started = [lines.index(f"unit {k} of 2 {arm}-seed0: training") for k, arm in enumerate(arms, 1)]
    finished = [i for i, line in enumerate(lines) if line.startswith("unit ") and ": accuracy " in line]
    assert len(finished) == 2 and max(started) < min(finished)
    assert report["verdicts"]["weighted_x2"] in progress  # ab's report, worded as ab words it
    assert "Setting accelerator to CPU" not in done.stdout + done.stderr


def test_demo_hands_its_arms_seeds_and_task_to_ab(tmp_path):
    """The demo's arms (an arms file's too), seeds and stage-2 ratio are ab's, with the demo's test set; one seed,
    --seed's, by default."""
    from sftkey_plugin.cli.ab import resolve_arms
    from sftkey_plugin.cli.demo import ab_arguments
    from sftkey_plugin.cli.main import build_parser

    arms_file = tmp_path / "arms.yaml"
    arms_file.write_text("mine:\n  sftkey_mode: weighted\n  sftkey_key_weight: 1.5\n")
    argv = ["demo", "--arms", "sft,mine,two_stage", "--arms-file", str(arms_file), "--seeds", "0,1"]
    args = build_parser().parse_args([*argv, "--stage2-ratio", "0.7"])
    ab_args = ab_arguments(args, tmp_path, tmp_path / "config.yaml")
    assert (ab_args.config, ab_args.eval_data, ab_args.out) == (
        str(tmp_path / "config.yaml"), str(tmp_path / "test.jsonl"), str(tmp_path)
    )  # fmt: skip
    assert (ab_args.seeds, ab_args.stage2_ratio, ab_args.max_new_tokens) == ("0,1", 0.7, 64)
    assert resolve_arms(ab_args.arms, ab_args.arms_file, ab_args.stage2_ratio) == {
        "sft": {"sftkey": False},
        "mine": {"sftkey": True, "sftkey_mode": "weighted", "sftkey_key_weight": 1.5},
        "two_stage": {"sftkey": True, "sftkey_mode": "two_stage", "sftkey_stage2_ratio": 0.7},
    }
    default = ab_arguments(build_parser().parse_args(["demo", "--seed", "7"]), tmp_path, tmp_path)
    # plain SFT, the paper, the study's variant; stage 2 where this tiny model's stage 1 has converged
    assert (default.arms, default.stage2_ratio, default.seeds) == ("sft_equal,two_stage,weighted_x2", 0.8, "7")


def test_demo_arms_are_the_study_arms_and_bad_names_are_refused(tmp_path, capsys):
    from sftkey_plugin.cli.demo import ARM_LABELS, arm_settings

    assert arm_settings("sft_short", 800, 0.8) == (None, 640, 1.0)
    assert arm_settings("sft_equal", 800, 0.8) == (None, 800, 1.0)
    # sft_short ends where two_stage's stage 2 starts, rounded the same way (up)
    assert arm_settings("sft_short", 5, 0.5).steps == 3 and arm_settings("sft_short", 7, 0.5).steps == 4
    assert arm_settings("two_stage", 800, 0.8) == ({"sftkey_mode": "two_stage", "sftkey_stage2_ratio": 0.8}, 800, 1.0)
    soft = arm_settings("soft_stage2", 800, 0.8)[0]
    assert soft is not None and soft["sftkey_phases"][1] == {"start": 0.8, "key_weight": 1, "other_weight": 0.1}
    # the study's controls: x3 at plain SFT's loss scale, plain SFT at x3's loss scale (and x2 either side), longer
    assert arm_settings("weighted_x3_mean", 800, 0.8).sftkey == {
        "sftkey_mode": "weighted", "sftkey_key_weight": 3.0, "sftkey_normalize": "weights"
    }  # fmt: skip
    rates = [arm_settings(arm, 800, 0.8, loss_scale=1.4) for arm in ("sft_lr_low", "sft_lr_matched", "sft_lr_high")]
    assert [plan.learning_rate_scale for plan in rates] == [0.7, 1.4, 2.8] and {plan.sftkey for plan in rates} == {None}
    assert arm_settings("sft_steps_1.5x", 800, 0.8) == (None, 1200, 1.0)
    assert arm_settings("sft_steps_2x", 800, 0.8) == (None, 1600, 1.0)
    for arm in ARM_LABELS:  # every arm's settings are a valid configuration
        settings = arm_settings(arm, 800, 0.8)[0]
        if settings is not None:
            validate_sftkey_arguments(SFTKeyArguments(sftkey=True, **settings))
    # refused before anything is made: unknown, twice, none, and the study's arms that are not equal compute
    out = tmp_path / "demo"
    for bad, why in [
        ("sft_equal,nope", "unknown arm 'nope'"),
        ("two_stage,two_stage", "give distinct arm names"),
        (",", "give distinct arm names"),
        ("sft_equal,sft_short", "unknown arm 'sft_short' (it changes the steps or the learning rate"),
    ]:
        assert main(["demo", "--arms", bad, "--output-dir", str(out)]) == 2
        assert why in capsys.readouterr().err and not out.exists()
