"""Reliability evidence (issue 7): several processes, interruption, alignment under any text, hostile data, numerics.

Every run here is a real ``SFTKeyTrainer`` on the tiny offline model. Figures quoted in the README's Reliability
section are printed by these tests (run with ``-s`` to see them).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multiprocess_worker import (
    BAD_MASK_ERROR,
    GLOBAL_BATCH,
    INTERRUPT_AT,
    INTERRUPT_RUNS,
    INTERRUPT_STEPS,
    MODES,
    RUNS,
    interrupt_records,
    run_mode,
)
from process_exit import run_processes
from test_trl import GRAD_RTOL, PER_TOKEN, assert_gradients_close, first_batch, hand_step, logged, losses, trainer_for

from sftkey_plugin.examples import arithmetic_records
from sftkey_plugin.schedule import STAGE_KEY_ONLY
from sftkey_plugin.tiny import CHATML, SPECIAL
from sftkey_plugin.tokenize import MarkingOptions, tokenize_with_key_mask

TESTS = Path(__file__).parent
WORKER = TESTS / "multiprocess_worker.py"
EOS = "<|im_end|>"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run this module's tiny models on one intra-op thread: on 2 shared cores, 2 threads make each step ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two same-keyed tensor dicts."""
    assert a.keys() == b.keys() and a
    return max(float(torch.nan_to_num((a[k] - b[k]).abs().max(), nan=math.inf)) for k in a)  # NaN: never close


def subprocess_env() -> dict[str, str]:
    """The test's environment plus what a child needs: the sources on its path, CPU-only accelerate, 1 thread."""
    path = os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------------------------
# 1. Several processes: 2 CPU processes (gloo) against 1 process with the same global batch
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_process_runs(tiny_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``torchrun --nproc_per_node 2`` launch that trains every mode; a hang fails here (no deadlock)."""
    out = tmp_path_factory.mktemp("two_processes")
    # --standalone: torchrun picks a free rendezvous port itself, so no other run can take it in between
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(WORKER), "modes", tiny_dir, str(out)]
    started = time.monotonic()
    run_processes(command, 2, env=subprocess_env(), timeout=300)
    print(f"\n2-process launch (all modes): {time.monotonic() - started:.1f} s")
    return out


def two_processes(command: str, tiny_dir: str, out: Path) -> list[str]:
    """``torchrun --standalone --nproc_per_node 2`` of a worker command."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return [*launch, str(WORKER), command, tiny_dir, str(out)]


@pytest.mark.multiprocess
def test_a_log_on_one_process_only_neither_hangs_nor_takes_the_metrics(tiny_dir: str, tmp_path: Path) -> None:
    """The sftkey/* sums are reduced at the step end of a logging step, which every process reaches, not inside
    log(): a user's callback that logs on process 0 only does not wait for the other process (it used to hang), and
    its log entry carries none of the training metrics, which stay with the training log of each step."""
    run_processes(two_processes("rank0_log", tiny_dir, tmp_path), 2, env=subprocess_env(), timeout=240)
    history = torch.load(tmp_path / "log_history.pt")
    user = [h for h in history if "user/main_only" in h]
    training = [h for h in history if "loss" in h]
    assert [h["user/main_only"] for h in user] == [1.0, 2.0, 3.0, 4.0]
    assert not any(key.startswith("sftkey/") for h in user for key in h)
    assert [h["sftkey/stage"] for h in training] == [1, 1, 2, 2] and all("sftkey/key_fraction" in h for h in training)


def run_or_stop(command: list[str], log_path: Path, timeout: float) -> tuple[int, str]:
    """Run a launch to its end: its return code and output. One still running after ``timeout`` s (a process waiting
    at a barrier) fails the test, once stopped with SIGTERM, which torchrun passes on to its workers (they run in
    sessions of their own: killing torchrun alone would leave them waiting)."""
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait(timeout=60)
            pytest.fail(f"still running after {timeout} s, stopped:\n{log_path.read_text()[-5000:]}")
    return code, log_path.read_text()


@pytest.mark.multiprocess
@pytest.mark.stack  # where TRL opens its own main_process_first inside SFTKey's differs by trl version
@pytest.mark.parametrize(
    ("command", "error"),
    [
        ("refuse", "ValueError: SFTKey: 8 of 8 train examples have no key span"),  # raised after TRL's preparation
        ("bad_mask", f"TypeError: 'NoneType' {BAD_MASK_ERROR}"),  # raised inside TRL's own main_process_first
    ],
)
def test_a_failure_while_the_main_process_prepares_first_stops_every_process(
    tiny_dir: str, tmp_path: Path, command: str, error: str
) -> None:
    """The data fails process 0's preparation, which runs before the others'. Raised inside TRL's own
    main_process_first (bad_mask: every trl opens one within SFTKey's), the exception skipped that block's closing
    barrier, so the barriers of the two processes paired up wrongly and both waited for the gloo timeout (30 minutes;
    this test's 120 s). Now process 0 stops with its error and process 1, without preparing, with process 0's: both
    promptly, non-zero, after TRL's preparation (refuse) as inside it."""
    code, output = run_or_stop(two_processes(command, tiny_dir, tmp_path / "run"), tmp_path / "run.log", timeout=120)
    assert code != 0
    assert output.count(error) == 2, output[-5000:]  # each process shows it
    assert output.count(f"process 0 failed preparing the data: {error}") == 1, output[-5000:]  # process 1's


COMPARED_LOGS = ("loss", "grad_norm", "sftkey/stage", "sftkey/key_fraction", "sftkey/key_loss",
                 "sftkey/key_token_accuracy", "sftkey/reasoning_loss", "sftkey/mean_weight")  # fmt: skip


# Gradients agree to GRAD_RTOL of their scale (see test_trl), and with SGD each step moves a weight by lr * gradient:
# weights then agree to lr * steps * that tolerance, plus one rounding of each weight per step.


def sgd_tolerances(record: dict[str, Any], steps: int) -> tuple[float, float]:
    """The largest gradient and weight differences rounding allows between two SGD runs like ``record``."""
    assert record["optim"].lower().endswith("sgd"), "equality tests need plain SGD (Adam amplifies rounding to lr)"
    grad_scale = max(float(g.abs().max()) for step in record["grads"] for g in step.values())
    weight_scale = max(float(w.abs().max()) for w in record["weights"].values())
    grad_tol = GRAD_RTOL * grad_scale
    return grad_tol, record["learning_rate"] * steps * grad_tol + steps * 2.0**-24 * weight_scale


def assert_same_training(mode: str, multi: dict[str, Any], single: dict[str, Any], ranks: list[list[dict]]) -> None:
    """A 2-process record equals the 1-process one (logs, every step's gradients, final weights), and process 1 had
    steps without any key token (in the last step neither process had one) with no NaN. ``ranks``: each process's
    micro-batches. Prints the largest differences."""
    assert (multi["world_size"], single["world_size"]) == (2, 1)
    assert len(multi["logs"]) == len(single["logs"]) == 4
    for many, one in zip(multi["logs"], single["logs"]):
        assert {k for k in COMPARED_LOGS if k in many} == {k for k in COMPARED_LOGS if k in one}
        for key in COMPARED_LOGS:
            if key in one:  # logged values are float32 means: GRAD_RTOL relative, or that of a loss of ~1 near 0
                assert math.isfinite(many[key]) and many[key] == pytest.approx(one[key], rel=GRAD_RTOL, abs=GRAD_RTOL)
    loss_diff = max(abs(m["loss"] - o["loss"]) for m, o in zip(multi["logs"], single["logs"]))
    grad_diff = max(max_abs_diff(m, o) for m, o in zip(multi["grads"], single["grads"], strict=True))
    weight_diff = max_abs_diff(multi["weights"], single["weights"])
    grad_tol, weight_tol = sgd_tolerances(single, len(single["grads"]))
    print(
        f"\n{mode}: max |loss diff| {loss_diff:.2e}, max |grad diff| {grad_diff:.2e} (allowed {grad_tol:.1e}), "
        f"weights {weight_diff:.2e} (allowed {weight_tol:.1e})"
    )
    assert grad_diff < grad_tol and weight_diff < weight_tol

    # the metric sums are reduced once per log (every step here), not once per micro-batch
    assert multi["metric_gathers"] == single["metric_gathers"] == list(range(1, len(single["logs"]) + 1))

    rank0, rank1 = ranks
    assert all(math.isfinite(m["loss"]) for m in rank0 + rank1 + single["micro_batches"])
    keyless_steps = {m["step"] for m in rank1 if m["key_tokens"] == 0}
    assert {0, 2, 3} <= keyless_steps
    if not mode.startswith("weighted"):
        assert any(m["stage"] == STAGE_KEY_ONLY for m in rank1 if m["step"] in keyless_steps)
        assert multi["logs"][-1]["loss"] == 0.0 and "sftkey/key_loss" not in multi["logs"][-1]


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", list(RUNS))
def test_two_processes_equal_one_process(tiny_dir: str, tmp_path: Path, two_process_runs: Path, mode: str) -> None:
    """Losses, metrics, every step's gradients and the final weights match; a process without key tokens is fine."""
    multi = torch.load(two_process_runs / f"{mode}.pt")
    single = run_mode(tiny_dir, str(tmp_path), mode, GLOBAL_BATCH)
    ranks = [torch.load(two_process_runs / f"{mode}-rank{rank}.pt") for rank in (0, 1)]
    assert_same_training(mode, multi, single, ranks)


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["weighted", "weighted_by_weights"])
def test_weighted_loss_is_the_hand_computed_sum(
    tiny_dir: str, tmp_path: Path, two_process_runs: Path, mode: str
) -> None:
    """Key weight 3.0, other 0.5: the first step's logged loss and gradients are ``sum(w * NLL) / n`` computed by hand
    from the model's logits (``n`` the trained tokens, or the weight sum with ``sftkey_normalize="weights"``), with
    4 micro-batches of 1 row accumulated and on 2 processes of 2 rows."""
    settings = MODES[mode]
    accumulated = run_mode(tiny_dir, str(tmp_path), mode, 1, gradient_accumulation_steps=GLOBAL_BATCH)
    multi = torch.load(two_process_runs / f"{mode}.pt")
    assert multi["first_rows"] == accumulated["first_rows"]
    weights = {"key_weight": settings["sftkey_key_weight"], "other_weight": settings["sftkey_other_weight"]}
    loss, grads = hand_step(
        tiny_dir, accumulated["first_rows"], normalize=settings.get("sftkey_normalize", "tokens"), **weights
    )
    for record in (accumulated, multi):
        assert record["logs"][0]["loss"] == pytest.approx(loss, rel=GRAD_RTOL)
        diff = assert_gradients_close(record["grads"][0], grads)
        print(f"\n{mode}, {record['world_size']} process(es): loss {loss:.6f}, max |grad diff| {diff:.1e}")
    other, _ = hand_step(
        tiny_dir, accumulated["first_rows"], normalize="weights" if mode == "weighted" else "tokens", **weights
    )
    assert loss != pytest.approx(other, rel=1e-3)  # the two denominators differ on this data


# ---------------------------------------------------------------------------------------------------------------
# 2. Interruption: SIGKILL mid-stage-2 after a checkpoint, then resume
# ---------------------------------------------------------------------------------------------------------------


def kill_when_ready(command: list[str], env: dict[str, str], log_path: Path, ready: Path) -> int:
    """Start ``command``, SIGKILL it once it has written ``ready`` (stalled after its checkpoint); its return code."""
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        return process.wait(timeout=60)


@pytest.mark.parametrize("run", list(INTERRUPT_RUNS))
def test_killed_mid_stage_two_resumes_to_the_same_weights(
    tiny_dir: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, run: str
) -> None:
    """A run killed during step 5 (stage 2 began at step 3) resumes from checkpoint-4 and ends as if never stopped;
    with weights from the data too (message, example and prompt weights, read again by the resumed run)."""
    out, ready = tmp_path / "run", tmp_path / "ready"
    command = [sys.executable, str(WORKER), "interrupt", tiny_dir, str(out), str(ready), run]
    code = kill_when_ready(command, subprocess_env(), tmp_path / "killed.log", ready)
    assert ready.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    assert code == -signal.SIGKILL
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", f"checkpoint-{INTERRUPT_AT}"]
    saved = json.loads((out / f"checkpoint-{INTERRUPT_AT}" / "trainer_state.json").read_text())
    assert saved["global_step"] == INTERRUPT_AT
    assert [h["sftkey/stage"] for h in saved["log_history"] if "loss" in h] == [1, 1, 2, 2]

    switch = "SFTKey: stage 2 (key answer tokens only) from optimizer step 3."
    full = trainer_for(tiny_dir, interrupt_records(run), tmp_path / "full", **INTERRUPT_RUNS[run])
    with caplog.at_level(logging.INFO, logger="sftkey_plugin"):
        full.train()
    # one announcement (a set: with Axolotl's log routing installed by an earlier test, each record shows twice)
    assert {r.getMessage() for r in caplog.records if "SFTKey: stage 2" in r.getMessage()} == {switch}
    caplog.clear()
    resumed = trainer_for(tiny_dir, interrupt_records(run), out, **INTERRUPT_RUNS[run])
    with caplog.at_level(logging.INFO, logger="sftkey_plugin"):
        resumed.train(resume_from_checkpoint=True)  # the latest checkpoint in the output folder
    assert "SFTKey: stage 2" not in caplog.text  # resumed inside stage 2: no switch to announce

    assert resumed.state.global_step == full.state.global_step == INTERRUPT_STEPS
    assert resumed.sftkey_callback.schedule == full.sftkey_callback.schedule
    assert logged(resumed, "sftkey/stage") == logged(full, "sftkey/stage") == [1, 1, 2, 2, 2, 2]
    assert losses(resumed) == pytest.approx(losses(full), rel=1e-6)
    # steps 1-4 logged by the killed run, 5-6 by the resumed one
    mean_weights = logged(full, "sftkey/mean_weight")
    assert logged(resumed, "sftkey/mean_weight") == pytest.approx(mean_weights, rel=1e-6)
    if run == "two_stage_data":  # the data weights reached the loss (two_stage alone weighs every trained token 1)
        assert all(w != pytest.approx(1.0) for w in mean_weights)
    weights = {n: p.detach() for n, p in resumed.model.named_parameters()}
    diff = max_abs_diff(weights, {n: p.detach() for n, p in full.model.named_parameters()})
    print(f"\nresume after SIGKILL ({run}): max |weight diff| {diff:.2e}")
    assert diff < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# 3. Alignment under any text: three tokenizer families, plain text and a chat template, random spans
# ---------------------------------------------------------------------------------------------------------------


def _corpus() -> list[str]:
    texts = [r["text"] for r in arithmetic_records(200, seed=31, form="text")]
    return [*texts, *["naïve café 漢字 🙂 Ünïcödé résumé straße The answer is (B). #### 42 \\boxed{7}"] * 5]


def _fast(backend: Any, unk: str) -> Any:
    """Wrap a ``tokenizers`` object as a transformers fast tokenizer with the ChatML template and EOS."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=SPECIAL[0], unk_token=unk)
    fast.chat_template = CHATML
    return fast


def sentencepiece_tokenizer() -> Any:
    """A SentencePiece-style tokenizer: NFKC, Metaspace (``▁``), a Unigram model."""
    from tokenizers.implementations import SentencePieceUnigramTokenizer

    backend = SentencePieceUnigramTokenizer()
    backend.train_from_iterator(_corpus(), vocab_size=300, special_tokens=[*SPECIAL, "<unk>"], unk_token="<unk>")
    return _fast(backend._tokenizer, "<unk>")


def wordpiece_tokenizer() -> Any:
    """A BERT-style tokenizer: lowercasing, accent-stripping normaliser, WordPiece, ``[CLS] … [SEP]`` added."""
    from tokenizers import processors
    from tokenizers.implementations import BertWordPieceTokenizer

    backend = BertWordPieceTokenizer(lowercase=True, strip_accents=True)
    backend.train_from_iterator(_corpus(), vocab_size=300, special_tokens=[*SPECIAL, "[UNK]", "[CLS]", "[SEP]"])
    sep, cls = ("[SEP]", backend.token_to_id("[SEP]")), ("[CLS]", backend.token_to_id("[CLS]"))
    backend._tokenizer.post_processor = processors.BertProcessing(sep, cls)
    return _fast(backend._tokenizer, "[UNK]")


@pytest.fixture(scope="module")
def families(tokenizer: Any) -> dict[str, Any]:
    """Byte-level BPE (the project's tiny tokenizer), SentencePiece-style Unigram, and WordPiece."""
    return {"byte_bpe": tokenizer, "sentencepiece": sentencepiece_tokenizer(), "wordpiece": wordpiece_tokenizer()}


# Fragments that stress offsets: combining marks, astral characters, zero-width, NUL, case-folding that changes
# length, markers the finders look for, and the EOS text itself
FRAGMENTS = [" ", "  ", "\n", "\t", "é", "e\u0301", "漢字", "🙂", "\u200b", "\x00", "İ", "ß", "ﬁ", "<Answer>",
             "</Thinking>", "####", EOS, "42", " The answer is"]  # fmt: skip
texts = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(FRAGMENTS)), min_size=1, max_size=8).map("".join)
CASES_PER_TEST = 1000


@st.composite
def text_and_span(draw: st.DrawFn) -> tuple[str, str, int, int, str, bool]:
    """A prompt, a non-empty completion, a non-empty span in it, an edge policy and the EOS flag."""
    completion = draw(texts.filter(bool))
    start = draw(st.integers(0, len(completion) - 1))
    end = draw(st.integers(start + 1, len(completion)))
    return draw(texts), completion, start, end, draw(st.sampled_from(["include", "exclude"])), draw(st.booleans())


def exact_span_finder(start: int, end: int) -> MarkingOptions:
    """The built-in regex finder made to return exactly ``[start, end)`` of the completion."""
    return MarkingOptions(finder="regex", finder_options={"pattern": rf"(?s)\A.{{{start}}}(?P<key>.{{{end - start}}})"})


def render(tokenizer: Any, prompt: str, completion: str, form: str) -> tuple[dict[str, Any], str, int, bool]:
    """The record, the text SFTTrainer tokenises, where the completion starts in it, and whether specials are added."""
    if form == "text":
        text = prompt + completion + ("" if completion.endswith(EOS) else EOS)
        return {"prompt": prompt, "completion": completion}, text, len(prompt), True
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    start = len(tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True))
    return {"messages": messages}, text, start, False


def check_key_mask(mask: list[int], ids: list[int], offsets: list[tuple[int, int]], text: str, span: tuple[int, int],
                   edge: str, eos_id: int | None) -> None:  # fmt: skip
    """Key tokens = the tokens of the span (overlapping it under include, inside it under exclude), plus, only with
    ``eos_id``, the EOS that follows the span with nothing but whitespace or zero-width tokens in between."""
    lo, hi = span
    if edge == "include":
        in_span = [b > a and a < hi and b > lo for a, b in offsets]
    else:
        in_span = [b > a and lo <= a and b <= hi for a, b in offsets]
    assert all(m for m, s in zip(mask, in_span) if s), "a token of the span is not key"
    extras = [i for i, (m, s) in enumerate(zip(mask, in_span)) if m and not s]
    last = max((i for i, s in enumerate(in_span) if s), default=None)
    following = next((i for i in range(last + 1, len(ids)) if ids[i] == eos_id), None) if last is not None else None
    blank = following is not None and all(not text[slice(*offsets[i])].strip() for i in range(last + 1, following))
    if eos_id is None or not blank:
        assert extras == [], f"tokens outside the span are key: {extras}"
    else:
        assert extras == list(range(last + 1, following + 1)), "the EOS edge is not exactly blank tokens + EOS"


@pytest.mark.parametrize("form", ["text", "chat"])
@pytest.mark.parametrize("family", ["byte_bpe", "sentencepiece", "wordpiece"])
@settings(max_examples=CASES_PER_TEST, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(case=text_and_span())
def test_key_tokens_are_the_span_under_any_text(families: dict[str, Any], family: str, form: str, case: tuple) -> None:
    """Through ``tokenize_with_key_mask`` (the trainer's own tokenisation): the key mask is exactly the span's tokens
    plus the documented edge tokens, for random unicode text, with every tokenizer family, plain and templated."""
    prompt, completion, start, end, edge, include_eos = case
    tokenizer = families[family]
    record, text, at, specials = render(tokenizer, prompt, completion, form)
    assert text[at : at + len(completion)] == completion
    marking = exact_span_finder(start, end)
    marking.edge_tokens, marking.include_eos = edge, include_eos
    encoded = tokenize_with_key_mask(record, tokenizer, marking)
    reference = tokenizer(text, add_special_tokens=specials, return_offsets_mapping=True)
    assert encoded["input_ids"] == reference["input_ids"] and encoded["sftkey_finder"] == "regex"
    eos_id = tokenizer.eos_token_id if include_eos else None
    check_key_mask(encoded["sftkey_mask"], encoded["input_ids"], reference["offset_mapping"], text,
                   (at + start, at + end), edge, eos_id)  # fmt: skip


def test_short_assistant_content_is_located_in_its_own_turn(tiny_dir: str, tmp_path: Path) -> None:
    """A multiple-choice completion "d" (field finder) must mark "d", not the ``<|im_end|>`` after it."""
    record = {
        "prompt": [{"role": "user", "content": "Pick a, b, c or d."}],
        "completion": [{"role": "assistant", "content": "d"}],
        "answer": "d",
    }
    trainer = trainer_for(tiny_dir, [record], tmp_path, sftkey=True, sftkey_finder="field",
                          sftkey_finder_options={"answer_field": "answer"})  # fmt: skip
    assert key_texts(trainer) == [f"d{EOS}"]


# ---------------------------------------------------------------------------------------------------------------
# 4. Hostile data through the real trainer
# ---------------------------------------------------------------------------------------------------------------

THINK = "<Thinking>1 + 1 = 2.</Thinking>"
# completion -> the key text the trainer trains in stage 2 ("" = counted as without a key span)
HOSTILE_COMPLETIONS = {
    "empty completion": ("", ""),
    "whitespace-only completion": (" \n\t ", ""),
    "only whitespace after </Thinking>": (THINK + "  \n", ""),
    "unclosed <Thinking>, no answer": ("<Thinking>1 + 1 = 2.", ""),
    "unclosed <Thinking>, then an answer": ("<Thinking>1 + 1 = 2.\n<Answer>2</Answer>", f"<Answer>2</Answer>{EOS}"),
    "unclosed <Answer>": (THINK + "\n<Answer>2", f"\n<Answer>2{EOS}"),
    "repeated blocks (the last one counts)": (
        f"{THINK}<Answer>1</Answer>{THINK}<Answer>2</Answer>",
        f"<Answer>2</Answer>{EOS}",
    ),
    "no answer, tags only in the prompt": ("I do not know.", ""),
    "emoji / CJK answer": (THINK + "\n<Answer>漢字 🙂</Answer>", f"\n<Answer>漢字 🙂</Answer>{EOS}"),
}


def plain(completion: str, prompt: str = "Q: 1 + 1?\n") -> dict[str, Any]:
    """A plain-string prompt/completion record."""
    return {"prompt": prompt, "completion": completion}


def key_texts(trainer: Any) -> list[str]:
    """The decoded key tokens of every training row, in dataset order."""
    tokenizer = trainer.processing_class
    rows = trainer.train_dataset
    return [tokenizer.decode([t for t, m in zip(r["input_ids"], r["sftkey_mask"]) if m]) for r in rows]


def test_hostile_completions_are_marked_or_counted(tiny_dir: str, tmp_path: Path) -> None:
    """Every malformed completion is either marked as documented or counted "without a key span"; none vanishes."""
    records = [plain(c) for c, _ in HOSTILE_COMPLETIONS.values()]
    records[list(HOSTILE_COMPLETIONS).index("no answer, tags only in the prompt")]["prompt"] = THINK + "<Answer>2"
    # most of these have no key: sftkey_min_found=0 lets the run start so the counts can be checked
    trainer = trainer_for(tiny_dir, records, tmp_path, sftkey=True, sftkey_on_missing="keep", sftkey_min_found=0)
    stats = trainer.sftkey_callback.data_stats[0]
    expected = [key for _, key in HOSTILE_COMPLETIONS.values()]
    assert key_texts(trainer) == expected
    missing = expected.count("")
    assert (stats.examples, stats.missing, stats.kept_without_key, stats.dropped) == (len(records), missing, missing, 0)
    assert f"{missing} without a key span" in stats.summary_line()


@pytest.mark.parametrize("answer", ["", "   "], ids=["empty", "whitespace"])
def test_empty_answer_block_counts_as_missing(tiny_dir: str, tmp_path: Path, answer: str) -> None:
    """An answer block with nothing in it has no key answer: it belongs to the ``sftkey_on_missing`` count."""
    records = [plain(f"{THINK}\n<Answer>{answer}</Answer>")]
    trainer = trainer_for(tiny_dir, records, tmp_path, sftkey=True, sftkey_on_missing="keep", sftkey_min_found=0)
    assert trainer.sftkey_callback.data_stats[0].missing == 1


def mixed_records() -> list[dict[str, Any]]:
    """4 answered records, 2 without an answer, 1 whose answer lies beyond max_length=96."""
    good = arithmetic_records(4, seed=32, form="prompt_completion_text")
    long = arithmetic_records(1, seed=33, form="prompt_completion_text", terms=14)
    return [*good, plain("Hello."), plain("No idea, sorry."), *long]


@pytest.mark.parametrize("policy", ["keep", "drop", "error"])
def test_mixed_dataset_follows_the_policy_with_counts(tiny_dir: str, tmp_path: Path, policy: str) -> None:
    """Only some records have a (whole) answer: each ``sftkey_on_missing`` does what it says and counts it."""
    if policy == "error":
        with pytest.raises(ValueError, match=r"2 of 7 train examples have no key span and 1 had their answer cut"):
            trainer_for(tiny_dir, mixed_records(), tmp_path, sftkey=True, sftkey_on_missing=policy, max_length=96)
        return
    trainer = trainer_for(tiny_dir, mixed_records(), tmp_path, sftkey=True, sftkey_on_missing=policy, max_length=96)
    stats = trainer.sftkey_callback.data_stats[0]
    assert (stats.examples, stats.found, stats.missing, stats.cut) == (7, 5, 2, 1)
    assert (stats.kept_without_key, stats.dropped) == ((3, 0) if policy == "keep" else (0, 3))
    assert len(trainer.train_dataset) == (7 if policy == "keep" else 4)
    assert sum(1 for m in trainer.train_dataset["sftkey_mask"] if 1 in m) == 4


def very_long_record() -> dict[str, Any]:
    """About 33k characters of reasoning before the answer."""
    return plain("<Thinking>" + "1 + 1 = 2. " * 3000 + "</Thinking>\n<Answer>2</Answer>")


@pytest.mark.parametrize(("truncation", "found"), [("keep_start", False), ("keep_end", True)])
def test_very_long_example(tiny_dir: str, tmp_path: Path, truncation: str, found: bool) -> None:
    """Cut to max_length: the answer is counted as cut (keep_start) or kept whole (keep_end)."""
    records = [*arithmetic_records(2, seed=34, form="prompt_completion_text"), very_long_record()]
    trainer = trainer_for(tiny_dir, records, tmp_path, sftkey=True, max_length=64, truncation_mode=truncation)
    stats = trainer.sftkey_callback.data_stats[0]
    assert max(len(ids) for ids in trainer.train_dataset["input_ids"]) <= 64
    assert (stats.cut, stats.kept_without_key) == ((0, 0) if found else (1, 1))
    assert key_texts(trainer)[-1] == (f"\n<Answer>2</Answer>{EOS}" if found else "")


def _messages(assistant: Any, user: Any = "hi") -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


PARTS = [{"type": "text", "text": THINK}]  # multimodal-style content (a list of parts) in every message


# records -> the ValueError message SFTKey gives
CLEAR_ERRORS = {
    "completion is a number": ([{"prompt": "Q", "completion": 5}], "must both be strings or both message lists"),
    "text is a number": ([{"text": 5}], "cannot read a record with columns"),
    "completion missing in some rows": ([plain(THINK), {"prompt": "Q"}], "got str and NoneType"),
    "assistant content None": ([_messages(None)], "content to be a string, not NoneType"),
    "assistant content is a list of parts": ([_messages(PARTS, PARTS)], "not list"),
    "no assistant message": ([{"messages": [{"role": "user", "content": "hi"}]}], "no assistant message"),
    "field finder, no answer column": ([plain(THINK)], "needs each record to have the answer field"),
}


@pytest.mark.parametrize("name", list(CLEAR_ERRORS))
def test_wrong_types_and_missing_fields_get_a_clear_error(tiny_dir: str, tmp_path: Path, name: str) -> None:
    """Each is refused with a ``ValueError`` that names the problem, before any training."""
    records, message = CLEAR_ERRORS[name]
    field = {"sftkey_finder": "field", "sftkey_finder_options": {"answer_field": "answer"}} if "field" in name else {}
    with pytest.raises(ValueError, match=message):
        trainer_for(tiny_dir, records, tmp_path, sftkey=True, **field)


UNCLEAR_ERRORS = {
    "no prompt/completion/text/messages column": [{"question": "Q", "answer": "2"}],
    "prompt without a completion column": [{"prompt": "Q"}],
    "messages is a string": [{"messages": "hello"}],
    "conversational prompt, string completion": [{"prompt": [{"role": "user", "content": "Q"}], "completion": THINK}],
}


@pytest.mark.parametrize("name", list(UNCLEAR_ERRORS))
def test_unrecognised_record_form_gets_a_clear_error(tiny_dir: str, tmp_path: Path, name: str) -> None:
    """A record in none of TRL's forms should get a ValueError listing them, not ``KeyError: 'text'``."""
    with pytest.raises(ValueError, match=r"messages.*prompt.*completion.*text"):
        trainer_for(tiny_dir, UNCLEAR_ERRORS[name], tmp_path, sftkey=True)


def test_answer_field_none_counts_as_missing(tiny_dir: str, tmp_path: Path) -> None:
    """Field finder: a numeric answer is found; a record without an answer value is counted as without a key span."""
    records = [{**plain(f"{THINK}\n<Answer>2</Answer>"), "answer": 2}, {**plain("Hello."), "answer": None}]
    trainer = trainer_for(tiny_dir, records, tmp_path, sftkey=True, sftkey_finder="field",
                          sftkey_finder_options={"answer_field": "answer"})  # fmt: skip
    stats = trainer.sftkey_callback.data_stats[0]
    assert (stats.found, stats.missing) == (1, 1)


def test_answer_field_none_never_marks_the_word_none(tiny_dir: str, tmp_path: Path) -> None:
    """A record whose answer is None has no key span, even if its completion says "None"."""
    records = [{**plain("The function returns None."), "answer": None}]
    trainer = trainer_for(tiny_dir, records, tmp_path, sftkey=True, sftkey_finder="field", sftkey_min_found=0,
                          sftkey_finder_options={"answer_field": "answer"})  # fmt: skip
    assert trainer.sftkey_callback.data_stats[0].missing == 1


def test_template_that_rewrites_the_answer_is_counted(tiny_dir: str, tmp_path: Path) -> None:
    """A chat template that alters the assistant text: the answer cannot be placed, so it is counted as missing."""
    template = tmp_path / "upper.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] + ': ' + m['content'] | upper + '\n' }}{% endfor %}")
    records = arithmetic_records(2, seed=35, form="messages")
    trainer = trainer_for(
        tiny_dir, records, tmp_path, sftkey=True, chat_template_path=str(template), sftkey_min_found=0
    )
    stats = trainer.sftkey_callback.data_stats[0]
    assert (stats.missing, stats.kept_without_key, stats.not_located, dict(stats.by_finder)) == (2, 2, 2, {})
    assert "(2 altered by the chat template)" in stats.summary_line()


def test_pretokenised_data_without_a_mask_is_marked_from_its_tokens(tiny_dir: str, tmp_path: Path) -> None:
    """Rows that arrive tokenised (input_ids + completion_mask) are marked from their own tokens: the same mask as
    when SFTKey tokenises the raw records."""
    from transformers import AutoTokenizer

    from sftkey_plugin.tokenize import MarkingOptions, tokenize_with_key_mask

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    raw = arithmetic_records(4, seed=36, form="prompt_completion_text")
    tokenised = [tokenize_with_key_mask(r, tokenizer, MarkingOptions()) for r in raw]
    rows = [{"input_ids": t["input_ids"], "completion_mask": t["completion_mask"]} for t in tokenised]
    trainer = trainer_for(tiny_dir, rows, tmp_path, sftkey=True, completion_only_loss=True)
    assert trainer.train_dataset["sftkey_mask"] == [t["sftkey_mask"] for t in tokenised]
    assert trainer.sftkey_callback.data_stats[0].found == 4


def test_empty_dataset_fails_as_in_stock_trl(tiny_dir: str, tmp_path: Path) -> None:
    """An empty dataset fails inside TRL's own ``__init__`` before SFTKey runs, exactly as with ``SFTTrainer``."""
    import trl

    errors = []
    for extra in ({"trainer_cls": trl.SFTTrainer}, {"sftkey": True}):
        with pytest.raises(Exception) as caught:  # both must raise the same type, whatever it is
            trainer_for(tiny_dir, [], tmp_path, **extra)
        errors.append(caught.type)
    assert errors[0] is errors[1]


# ---------------------------------------------------------------------------------------------------------------
# 5. Numerics: bf16 / fp16 autocast on CPU, batches with no key token left
# ---------------------------------------------------------------------------------------------------------------

NUMERIC_MODES = {
    "two_stage": {"sftkey_mode": "two_stage", "sftkey_stage2_steps": 2},
    "weighted": {"sftkey_mode": "weighted", "sftkey_key_weight": 3.0, "sftkey_other_weight": 0.5},
}


def assert_meaningful_metrics(trainer: Any) -> None:
    """Finite losses; key loss/accuracy/fraction present and in range whenever key tokens were scored."""
    for entry in (h for h in trainer.state.log_history if "loss" in h):
        assert math.isfinite(entry["loss"]) and math.isfinite(entry.get("grad_norm", 0.0))
        assert 0.0 <= entry["sftkey/key_fraction"] < 1.0
        if "sftkey/key_loss" in entry:
            assert 0.0 < entry["sftkey/key_loss"] < 50.0 and 0.0 <= entry["sftkey/key_token_accuracy"] <= 1.0


@pytest.mark.parametrize("mode", list(NUMERIC_MODES))
def test_bf16_autocast_on_cpu(tiny_dir: str, tmp_path: Path, mode: str) -> None:
    """bf16 mixed precision on CPU (use_cpu=True): the model really runs in bf16, losses track the fp32 run."""
    records = arithmetic_records(16, seed=36, form="prompt_completion")
    common = dict(sftkey=True, max_steps=4, use_cpu=True, **NUMERIC_MODES[mode], **PER_TOKEN)
    reference = trainer_for(tiny_dir, records, tmp_path / "fp32", **common)
    reference.train()
    trainer = trainer_for(tiny_dir, records, tmp_path / "bf16", bf16=True, **common)
    dtypes: list[torch.dtype] = []
    trainer.model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    trainer.train()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert_meaningful_metrics(trainer)
    diff = max(abs(a - b) / b for a, b in zip(losses(trainer), losses(reference), strict=True))
    print(f"\nbf16 {mode}: max relative loss difference to fp32 {diff:.1e}")
    assert diff < 2e-2
    assert logged(trainer, "sftkey/stage") == logged(reference, "sftkey/stage")


@pytest.mark.parametrize("mode", ["key_only", "weighted"])
def test_fp16_autocast_on_cpu(tiny_dir: str, tmp_path: Path, mode: str) -> None:
    """The SFTKey loss under ``torch.autocast('cpu', float16)``: finite, close to fp32, finite gradients.

    (``fp16=True`` in the trainer does not autocast on CPU: accelerate leaves native AMP off there.)"""
    options = {"key_only": {"sftkey_mode": "key_only"}, "weighted": NUMERIC_MODES["weighted"]}[mode]
    trainer = trainer_for(tiny_dir, arithmetic_records(8, seed=37, form="messages"), tmp_path, sftkey=True,
                          **options, **PER_TOKEN)  # fmt: skip
    batch = first_batch(trainer)
    trainer.model.train()
    with torch.no_grad():
        full = float(trainer.compute_loss(trainer.model, dict(batch)))
    with torch.autocast("cpu", dtype=torch.float16):
        half = trainer.compute_loss(trainer.model, dict(batch))
    half.backward()
    half = half.detach()
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    print(f"\nfp16 {mode}: loss {float(half):.5f} vs fp32 {full:.5f}")
    assert math.isfinite(float(half)) and float(half) == pytest.approx(full, rel=1e-2)
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("mode", ["key_only", "two_stage"])
def test_every_key_token_truncated(tiny_dir: str, tmp_path: Path, mode: str) -> None:
    """All answers cut by max_length (kept): stage-2 steps have no key token; loss 0, no NaN, no fake key_loss."""
    records = arithmetic_records(8, seed=38, form="prompt_completion", terms=12)
    trainer = trainer_for(tiny_dir, records, tmp_path, sftkey=True, sftkey_mode=mode, sftkey_stage2_steps=1,
                          max_length=64, max_steps=2, sftkey_min_found=0)  # fmt: skip
    assert trainer.sftkey_callback.data_stats[0].cut == 8
    trainer.train()
    assert_meaningful_metrics(trainer)
    stage2 = [h for h in trainer.state.log_history if h.get("sftkey/stage") == STAGE_KEY_ONLY]
    assert stage2 and all(h["loss"] == 0.0 and h["grad_norm"] == 0.0 for h in stage2)
    assert all("sftkey/key_loss" not in h and h["sftkey/key_fraction"] == 0.0 for h in stage2)


def test_key_mask_only_on_padding(tiny_dir: str, tmp_path: Path) -> None:
    """A batch whose only "key" positions are padding: the step counts no key token, and its loss is a finite 0 (the
    count is clamped to 1, not left at 0 for the loss to divide by, on every trl loss path), with no key metrics."""
    records = arithmetic_records(4, seed=39, form="prompt_completion", terms=2)
    records[0] = arithmetic_records(1, seed=40, form="prompt_completion", terms=9)[0]  # longer: the others get padding
    trainer = trainer_for(tiny_dir, records, tmp_path, sftkey=True, sftkey_mode="key_only")
    batch = first_batch(trainer)
    padding = batch["attention_mask"] == 0
    assert padding.any()
    batch["sftkey_mask"] = padding.long()
    trainer.model.train()
    trainer._sftkey_counting_step = True  # as get_batch_samples counts an optimizer step's micro-batches
    count = trainer._get_num_items_in_batch([batch], batch["input_ids"].device)
    trainer._sftkey_counting_step = False
    assert int(count) == 1
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=count)
    assert loss.item() == 0.0
    trainer._sftkey_reduce("train", reduced=True)  # as a logging step does (one process: nothing to gather)
    metrics = trainer._sftkey_ready["train"]
    assert metrics["sftkey/key_fraction"] == 0.0 and "sftkey/key_loss" not in metrics
