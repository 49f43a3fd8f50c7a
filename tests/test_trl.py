"""Real ``trl.SFTTrainer`` / ``SFTKeyTrainer`` runs on a tiny model: exactness, stages, resume, policies, metrics."""

from __future__ import annotations

import math

import pytest
import torch
import trl
from datasets import Dataset
from packaging.version import Version

from sftkey_plugin import SFTKeyArguments, SFTKeyCallback, SFTKeyConfig, SFTKeyTrainer
from sftkey_plugin.examples import arithmetic_records

# trl < 1.15 has no per-token fused head: its default chunked NLL gives totals only, so weighted mode (and the
# key/reasoning split in stage 1) needs loss_type="nll" there
from sftkey_plugin.trl.trainer import FUSED_HEAD

# run in every test environment, on its trl (the Axolotl stacks pin 1.9 and 1.14.1): scripts/test.sh
pytestmark = pytest.mark.stack

PER_TOKEN = {} if FUSED_HEAD else {"loss_type": "nll"}

# float32 carries 24 bits: one rounding is 2**-24 relative, and summing a gradient in another order (2 processes,
# gradient accumulation, a padded batch against rows one by one) moves it by a few hundred roundings at most. So
# gradients and losses computed two ways must agree to GRAD_RTOL of their scale.
GRAD_RTOL = 2.0**-24 * 300


def assert_gradients_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """Every gradient within GRAD_RTOL of the largest expected one; returns the largest difference."""
    assert actual.keys() == expected.keys() and expected
    scale = max(float(g.abs().max()) for g in expected.values())
    diff = max(float((actual[n] - expected[n]).abs().max()) for n in expected)
    assert diff <= GRAD_RTOL * scale, (diff, scale)
    return diff


def config(out, config_cls=SFTKeyConfig, **overrides) -> SFTKeyConfig:
    values = dict(
        output_dir=str(out),
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        max_steps=3,
        per_device_train_batch_size=4,
        # Plain SGD: its update is linear in the gradient, so a 1e-7 rounding difference between two runs (another
        # processor, process count or batch split) stays a 1e-10 weight difference; Adam turns it into about +-lr.
        optim="sgd",
        learning_rate=1e-3,
        seed=0,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        max_length=128,
    )
    values.update(overrides)
    if Version(trl.__version__) < Version("1.16"):
        values.pop("train_sampling_strategy")  # the 1.9 stack has no such option; its sampler is set below
    return config_cls(**values)


def trainer_for(tiny_dir, records, out, trainer_cls=SFTKeyTrainer, peft_config=None, callbacks=None, **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = config(out, **overrides)
    kwargs = {"peft_config": peft_config} if peft_config is not None else {}
    kwargs.update({"callbacks": callbacks} if callbacks is not None else {})
    trainer = trainer_cls(
        model=AutoModelForCausalLM.from_pretrained(tiny_dir),
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=AutoTokenizer.from_pretrained(tiny_dir),
        **kwargs,
    )
    if Version(trl.__version__) < Version("1.16"):
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    return trainer


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def logged(trainer, key) -> list[float]:
    return [h[key] for h in trainer.state.log_history if "loss" in h]


def merges_with_completion(tokenizer, record) -> bool:
    """Whether the prompt's last token merges with the completion's first (the prompt alone is no token prefix)."""
    prompt = tokenizer(record["prompt"])["input_ids"]
    return tokenizer(record["prompt"] + record["completion"])["input_ids"][: len(prompt)] != prompt


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("form", ["prompt_completion", "prompt_completion_text"])
def test_weighted_one_one_is_stock_sft(tiny_dir, tokenizer, tmp_path, packing, form):
    """The same trained tokens and the same training as stock ``SFTTrainer``, also where the prompt ("...Response: ")
    merges with the completion (" <" is one token), which trl < 1.15 and >= 1.15 treat differently."""
    records = arithmetic_records(24, seed=1, form=form)
    if form == "prompt_completion_text":
        assert all(merges_with_completion(tokenizer, r) for r in records)
    common = dict(packing=packing, **PER_TOKEN)
    stock = trainer_for(tiny_dir, records, tmp_path / "stock", trl.SFTTrainer, **common)
    key = trainer_for(tiny_dir, records, tmp_path / "key", sftkey=True, sftkey_mode="weighted", **common)

    def no_correction(*args):
        raise AssertionError("weighted 1.0/1.0 must not compute a correction: it is zero")

    key._sftkey_correction = no_correction
    for column in ("input_ids", "labels"):
        assert key.train_dataset[column] == stock.train_dataset[column], column
    stock.train()
    key.train()
    assert len(losses(stock)) == 3
    assert losses(key) == losses(stock)  # the same computation: bit for bit
    for (name, p), q in zip(stock.model.named_parameters(), key.model.parameters()):
        assert torch.equal(p, q), name


def first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v.to(trainer.args.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def test_key_only_loss_is_mean_cross_entropy_over_key_tokens(tiny_dir, tmp_path):
    records = arithmetic_records(8, seed=2, form="messages")
    trainer = trainer_for(tiny_dir, records, tmp_path, sftkey=True, sftkey_mode="key_only")
    batch = first_batch(trainer)
    trainer.model.train()
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = trainer.compute_loss(trainer.model, dict(batch))
    key = (batch["sftkey_mask"][:, 1:] == 1) & (batch["labels"][:, 1:] != -100)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:].clamp(min=0), reduction="none"
    )
    assert key.sum() >= 4 * 5  # every example of the batch has its answer block
    assert float(loss) == pytest.approx(float(nll[key].mean()), abs=1e-5)


def gradients_of_first_step(trainer) -> dict[str, torch.Tensor]:
    grads: dict[str, torch.Tensor] = {}

    class Grab(SFTKeyCallback.__mro__[1]):  # a plain TrainerCallback
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if not grads:
                grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    trainer.add_callback(Grab())
    trainer.train()
    return grads


@pytest.mark.parametrize(
    ("mode", "extra"),
    [("key_only", {}), ("weighted", {"sftkey_key_weight": 3.0, "sftkey_other_weight": 0.5})],
)
def test_gradient_accumulation_4x1_equals_1x4(tiny_dir, tmp_path, mode, extra):
    records = arithmetic_records(8, seed=3, form="prompt_completion")
    common = dict(sftkey=True, sftkey_mode=mode, max_steps=1, **extra, **PER_TOKEN)
    big = gradients_of_first_step(
        trainer_for(
            tiny_dir,
            records,
            tmp_path / "a",
            per_device_train_batch_size=4,
            gradient_accumulation_steps=1,
            **common,
        )
    )
    small = gradients_of_first_step(
        trainer_for(
            tiny_dir,
            records,
            tmp_path / "b",
            per_device_train_batch_size=1,
            gradient_accumulation_steps=4,
            **common,
        )
    )
    assert big.keys() == small.keys() and big
    for name in big:
        assert torch.allclose(big[name], small[name], atol=1e-6, rtol=1e-4), name


def hand_weighted_loss(model, rows, key_weight, other_weight, normalize="tokens", dft=False):
    """``sum(w * loss_t) / n`` over ``rows`` (dicts with ``input_ids``, ``labels``, ``sftkey_mask``) from the model's
    own logits, written out here: ``loss_t`` is the NLL of label t+1 (times its detached probability for DFT), ``w``
    ``key_weight`` on key tokens and ``other_weight`` on the other trained ones, ``n`` the number of trained tokens
    or the sum of their weights. Returns the loss (with a graph, for its gradients)."""
    total, denominator = 0.0, 0.0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        for t, (label, key) in enumerate(zip(row["labels"][1:], row["sftkey_mask"][1:])):
            if label == -100:
                continue
            nll = -log_probs[t, label]
            loss_t = nll * torch.exp(-nll).detach() if dft else nll
            w = key_weight if key else other_weight
            total = total + w * loss_t
            denominator += w if normalize == "weights" else 1
    return total / max(denominator, 1)


def hand_step(tiny_dir, rows, **weights):
    """The hand-computed loss of one optimizer step over ``rows`` from the initial tiny model, and its gradients."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    loss = hand_weighted_loss(model, rows, **weights)
    loss.backward()
    return float(loss.detach()), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def dataset_rows(trainer, n: int) -> list[dict]:
    """The first ``n`` prepared rows of the trainer's train dataset (its first optimizer step, sampled in order)."""
    return [trainer.train_dataset[i] for i in range(n)]


@pytest.mark.skipif(not FUSED_HEAD, reason="trl < 1.15 runs DFT through compute_loss_func; refused there (below)")
def test_weighted_dft_weighs_the_dft_loss(tiny_dir, tmp_path):
    """``loss_type="dft"`` + weighted 3.0/0.5: the loss is ``sum(w * p * NLL) / n`` (DFT's per-token loss weighted),
    not DFT plus a plain-NLL correction."""
    records = arithmetic_records(4, seed=3, form="prompt_completion")
    trainer = trainer_for(
        tiny_dir, records, tmp_path, sftkey=True, sftkey_mode="weighted", sftkey_key_weight=3.0,
        sftkey_other_weight=0.5, loss_type="dft", max_steps=1,
    )  # fmt: skip
    expected, expected_grads = hand_step(tiny_dir, dataset_rows(trainer, 4), key_weight=3.0, other_weight=0.5, dft=True)
    grads = gradients_of_first_step(trainer)
    assert losses(trainer)[0] == pytest.approx(expected, rel=GRAD_RTOL)
    assert_gradients_close(grads, expected_grads)
    plain, _ = hand_step(tiny_dir, dataset_rows(trainer, 4), key_weight=1.0, other_weight=1.0, dft=True)
    assert expected != pytest.approx(plain, rel=1e-3)  # the weights matter


@pytest.mark.skipif(FUSED_HEAD, reason="trl >= 1.15 weighs DFT's per-token loss (test above)")
def test_dft_is_refused_where_it_has_no_per_token_loss(tiny_dir, tmp_path):
    records = arithmetic_records(4, seed=3, form="prompt_completion")
    with pytest.raises(ValueError, match="loss_type='dft' on trl"):
        trainer_for(tiny_dir, records, tmp_path, sftkey=True, sftkey_mode="weighted", loss_type="dft")


def test_stage_two_counts_each_optimizer_step_once(tiny_dir, tmp_path, monkeypatch):
    """The loss denominator of a step (a count over its micro-batches, all-gathered across processes) is counted
    once in stage 1 and once in stage 2, where it is the key-token count."""
    import transformers

    counted = []
    stock_count = transformers.Trainer._get_num_items_in_batch

    def counting(self, batches, device):
        counted.append(self.state.global_step)
        return stock_count(self, batches, device)

    monkeypatch.setattr(transformers.Trainer, "_get_num_items_in_batch", counting)
    records = arithmetic_records(16, seed=4, form="prompt_completion")
    trainer = trainer_for(
        tiny_dir, records, tmp_path, sftkey=True, sftkey_stage2_steps=2, max_steps=4, gradient_accumulation_steps=2,
        per_device_train_batch_size=2, **PER_TOKEN,
    )  # fmt: skip
    trainer.train()
    assert counted == [0, 1, 2, 3]
    assert logged(trainer, "sftkey/stage") == [1, 1, 2, 2]
    stage2 = [h for h in trainer.state.log_history if h.get("sftkey/stage") == 2]
    assert all(h["loss"] == pytest.approx(h["sftkey/key_loss"], rel=GRAD_RTOL) for h in stage2)


@pytest.mark.parametrize("mode", ["key_only", "weighted", "two_stage"])
def test_packing_on_and_off_give_the_same_loss(tiny_dir, tmp_path, mode):
    records = arithmetic_records(8, seed=4, form="prompt_completion")
    common = dict(sftkey=True, sftkey_mode=mode, sftkey_key_weight=2.0, max_steps=1, max_length=512, **PER_TOKEN)
    unpacked = trainer_for(tiny_dir, records, tmp_path / "u", per_device_train_batch_size=8, **common)
    unpacked.train()
    packed = trainer_for(tiny_dir, records, tmp_path / "p", per_device_train_batch_size=1, packing=True, **common)
    assert len(packed.train_dataset) == 1  # all 8 examples in one bin: the same tokens in one step
    packed.train()
    assert losses(packed) == pytest.approx(losses(unpacked), abs=1e-5)


@pytest.mark.parametrize(
    "layout",
    [
        {"packing": True, "packing_strategy": "bfd_split", "max_length": 96},
        {"packing": True, "packing_strategy": "wrapped", "max_length": 96},
        {"padding_free": True, "max_length": None},
    ],
    ids=["bfd_split", "wrapped", "padding_free"],
)
def test_packing_layouts_carry_the_mask_and_train_as_stock(tiny_dir, tmp_path, layout):
    """Each layout the README lists: the rows are stock TRL's, every key token keeps its place (the same key tokens
    as without packing, each on a trained position), and weighted 1.0/1.0 trains exactly as stock."""
    from collections import Counter

    records = arithmetic_records(12, seed=9, form="prompt_completion")
    common = dict(per_device_train_batch_size=2, **layout, **PER_TOKEN)
    stock = trainer_for(tiny_dir, records, tmp_path / "stock", trl.SFTTrainer, **common)
    key = trainer_for(tiny_dir, records, tmp_path / "key", sftkey=True, sftkey_mode="weighted", **common)
    unpacked = trainer_for(
        tiny_dir, records, tmp_path / "plain", sftkey=True, sftkey_mode="weighted", max_length=None, **PER_TOKEN
    )
    for column in {"input_ids", "labels", "seq_lengths"} & set(stock.train_dataset.column_names):
        assert key.train_dataset[column] == stock.train_dataset[column], column

    def key_tokens(dataset) -> Counter:
        return Counter(t for row in dataset for t, m in zip(row["input_ids"], row["sftkey_mask"]) if m)

    assert key_tokens(key.train_dataset) == key_tokens(unpacked.train_dataset)
    assert sum(key_tokens(key.train_dataset).values()) >= 5 * len(records)
    for row in key.train_dataset:
        assert all(label != -100 for label, m in zip(row["labels"], row["sftkey_mask"]) if m)

    stock.train()
    key.train()
    assert losses(key) == losses(stock)
    for (name, p), q in zip(stock.model.named_parameters(), key.model.parameters()):
        assert torch.equal(p, q), name


def test_two_stage_switches_at_the_configured_step_and_after_resume(tiny_dir, tmp_path):
    records = arithmetic_records(48, seed=5, form="prompt_completion")
    common = dict(sftkey=True, sftkey_mode="two_stage", sftkey_stage2_steps=3, max_steps=6)
    full = trainer_for(tiny_dir, records, tmp_path / "full", **common)
    full.train()
    assert logged(full, "sftkey/stage") == [1, 1, 1, 2, 2, 2]
    # stage 2's loss is the key tokens' loss
    assert all(
        h["loss"] == pytest.approx(h["sftkey/key_loss"], rel=1e-4)
        for h in full.state.log_history
        if h.get("sftkey/stage") == 2 and "sftkey/key_loss" in h
    )

    saved = trainer_for(tiny_dir, records, tmp_path / "run", save_strategy="steps", save_steps=2, **common)
    saved.train()
    resumed = trainer_for(tiny_dir, records, tmp_path / "run", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    # the history holds steps 1-2 from the checkpoint, then the resumed steps 3-6
    assert [h["step"] for h in resumed.state.log_history if "loss" in h] == [1, 2, 3, 4, 5, 6]
    assert logged(resumed, "sftkey/stage") == [1, 1, 1, 2, 2, 2]
    assert losses(resumed) == pytest.approx(losses(full), rel=1e-5)


def test_stage_by_ratio_and_by_epoch(tiny_dir, tmp_path):
    records = arithmetic_records(16, seed=6, form="prompt_completion")
    by_ratio = trainer_for(tiny_dir, records, tmp_path / "r", sftkey=True, sftkey_stage2_ratio=0.25, max_steps=4)
    by_ratio.train()
    assert logged(by_ratio, "sftkey/stage") == [1, 2, 2, 2]
    by_epoch = trainer_for(
        tiny_dir,
        records,
        tmp_path / "e",
        sftkey=True,
        sftkey_stage2_epoch=1,
        max_steps=-1,
        num_train_epochs=2,
    )
    by_epoch.train()
    assert logged(by_epoch, "sftkey/stage") == [1, 1, 1, 1, 2, 2, 2, 2]


def test_stage_by_epoch_follows_the_real_epoch_boundary(tiny_dir, tmp_path):
    """4 steps per epoch, max_steps 6 (2 epochs, the second cut short): stage 2 starts with the 5th step, where the
    second epoch begins, not at the 4th as converting through max_steps / num_train_epochs (6 / 2) would have it."""
    records = arithmetic_records(16, seed=6, form="prompt_completion")
    trainer = trainer_for(tiny_dir, records, tmp_path, sftkey=True, sftkey_stage2_epoch=1, max_steps=6)
    trainer.train()
    assert logged(trainer, "epoch") == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    assert logged(trainer, "sftkey/stage") == [1, 1, 1, 1, 2, 2]


@pytest.mark.parametrize(
    ("config_start", "callback", "stages"),
    [
        ({"sftkey_stage2_steps": 1}, SFTKeyCallback(), [1, 2, 2, 2]),  # no argument: the config's start
        ({"sftkey_stage2_epoch": 0.75}, SFTKeyCallback(), [1, 1, 1, 2]),
        ({"sftkey_stage2_steps": 1}, SFTKeyCallback(stage2_ratio=0.75), [1, 1, 1, 2]),  # given: it overrides
        ({"sftkey_stage2_ratio": 0.25}, SFTKeyCallback(stage2_steps=2), [1, 1, 2, 2]),
    ],
)
def test_callback_passed_by_the_user_overrides_only_what_it_is_given(
    tiny_dir, tmp_path, config_start, callback, stages
):
    records = arithmetic_records(16, seed=6, form="prompt_completion")
    trainer = trainer_for(tiny_dir, records, tmp_path, callbacks=[callback], sftkey=True, max_steps=4, **config_start)
    assert trainer.sftkey_callback is callback
    trainer.train()
    assert logged(trainer, "sftkey/stage") == stages


def awkward_records() -> list[dict]:
    good = arithmetic_records(6, seed=7, form="prompt_completion")
    missing = [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "completion": [{"role": "assistant", "content": "Hello."}],
        }
        for _ in range(2)
    ]
    long = arithmetic_records(2, seed=8, form="prompt_completion", terms=12)  # answer beyond max_length
    return good + missing + long


def test_on_missing_keep_counts_and_trains_without_key_tokens(tiny_dir, tmp_path):
    trainer = trainer_for(tiny_dir, awkward_records(), tmp_path, sftkey=True, sftkey_on_missing="keep", max_length=96)
    stats = trainer.sftkey_callback.data_stats[0]
    assert (stats.examples, stats.found, stats.missing, stats.cut, stats.kept_without_key, stats.dropped) == (
        10,
        8,
        2,
        2,
        4,
        0,
    )
    masks = trainer.train_dataset["sftkey_mask"]
    assert len(masks) == 10 and sum(1 for m in masks if 1 not in m) == 4
    assert all(len(m) <= 96 for m in masks)
    assert "2 answers cut by truncation" in stats.summary_line()


def test_on_missing_drop_and_error(tiny_dir, tmp_path):
    trainer = trainer_for(tiny_dir, awkward_records(), tmp_path, sftkey=True, sftkey_on_missing="drop", max_length=96)
    assert len(trainer.train_dataset) == 6 and trainer.sftkey_callback.data_stats[0].dropped == 4
    with pytest.raises(ValueError, match="2 of 10 train examples have no key span and 2 had their answer cut"):
        trainer_for(tiny_dir, awkward_records(), tmp_path, sftkey=True, sftkey_on_missing="error", max_length=96)


def test_lora_with_packing_trains_and_logs_key_metrics(tiny_dir, tmp_path):
    from peft import LoraConfig

    records = arithmetic_records(32, seed=9, form="messages")
    trainer = trainer_for(
        tiny_dir,
        records,
        tmp_path,
        sftkey=True,
        sftkey_stage2_steps=2,
        max_steps=4,
        packing=True,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        **PER_TOKEN,
    )
    trainer.train()
    assert logged(trainer, "sftkey/stage") == [1, 1, 2, 2]
    assert all(math.isfinite(x) for x in losses(trainer))
    assert all(0 < x < 1 for x in logged(trainer, "sftkey/key_fraction"))
    assert all(
        "sftkey/key_loss" in h and "sftkey/key_token_accuracy" in h for h in trainer.state.log_history if "loss" in h
    )
    assert all("sftkey/reasoning_loss" in h for h in trainer.state.log_history if h.get("sftkey/stage") == 1)


def test_lora_weighted_one_one_is_stock_lora(tiny_dir, tmp_path):
    """Through PEFT the per-token losses still reach SFTKey (weighted needs them), and 1.0/1.0 is stock LoRA SFT."""
    from peft import LoraConfig

    records = arithmetic_records(16, seed=13, form="prompt_completion")
    runs = []
    for name, cls, extra in [("stock", trl.SFTTrainer, {}), ("key", SFTKeyTrainer, {"sftkey": True})]:
        # task_type CAUSAL_LM (as TRL's ModelConfig sets it): PEFT then calls the base model's forward directly
        lora = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="olora", task_type="CAUSAL_LM"
        )
        trainer = trainer_for(tiny_dir, records, tmp_path / name, cls, peft_config=lora, sftkey_mode="weighted",
                              **extra, **PER_TOKEN)  # fmt: skip
        trainer.train()
        runs.append(trainer)
    assert losses(runs[1]) == pytest.approx(losses(runs[0]), abs=1e-6)
    assert all("sftkey/key_loss" in h for h in runs[1].state.log_history if "loss" in h)


def test_evaluation_scores_every_completion_token_and_logs_both_parts(tiny_dir, tmp_path):
    records = arithmetic_records(8, seed=10, form="prompt_completion")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = SFTKeyTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_dir),
        args=config(tmp_path, sftkey=True, sftkey_mode="key_only", per_device_eval_batch_size=4, **PER_TOKEN),
        train_dataset=Dataset.from_list(records),
        eval_dataset=Dataset.from_list(records),
        processing_class=AutoTokenizer.from_pretrained(tiny_dir),
    )
    metrics = trainer.evaluate()
    assert metrics["eval_sftkey/stage"] == 2
    assert 0 < metrics["eval_sftkey/key_fraction"] < 1
    assert metrics["eval_sftkey/key_loss"] > 0 and metrics["eval_sftkey/reasoning_loss"] > 0
    # eval_loss covers every completion token: the token-weighted mean of its two parts
    f = metrics["eval_sftkey/key_fraction"]
    mixed = f * metrics["eval_sftkey/key_loss"] + (1 - f) * metrics["eval_sftkey/reasoning_loss"]
    assert metrics["eval_loss"] == pytest.approx(mixed, rel=1e-4)


def test_each_evaluation_reports_its_own_metrics_under_its_prefix(tiny_dir, tmp_path):
    """evaluate(metric_key_prefix=...) and predict() report their sftkey/* metrics under their prefix and leave
    nothing for the next evaluation; an evaluation run from a callback in the middle of training does not take (or
    add to) the training log's metrics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    records = arithmetic_records(8, seed=10, form="prompt_completion")

    def build(out, callbacks=None):
        return SFTKeyTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_dir),
            args=config(
                out, sftkey=True, sftkey_stage2_steps=1, max_steps=3, per_device_eval_batch_size=4, **PER_TOKEN
            ),
            train_dataset=Dataset.from_list(records),
            eval_dataset=Dataset.from_list(records),
            processing_class=AutoTokenizer.from_pretrained(tiny_dir),
            callbacks=callbacks,
        )

    def sftkey_metrics(metrics, prefix):
        return {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(f"{prefix}sftkey/")}

    def halves(trainer):  # the prepared evaluation rows, in two
        return trainer.eval_dataset.select(range(4)), trainer.eval_dataset.select(range(4, 8))

    alone = {}
    for name, half in (("first", 0), ("second", 1)):
        fresh = build(tmp_path / name)
        alone[name] = sftkey_metrics(fresh.evaluate(halves(fresh)[half]), "eval_")
    assert set(alone["first"]) == {
        "sftkey/stage", "sftkey/key_fraction", "sftkey/key_loss", "sftkey/key_token_accuracy", "sftkey/reasoning_loss"
    }  # fmt: skip
    assert alone["first"]["sftkey/key_loss"] != pytest.approx(alone["second"]["sftkey/key_loss"], rel=1e-3)
    trainer = build(tmp_path / "eval")
    first, second = halves(trainer)
    # each one reports its own data only (what one left behind would move the next one's means)
    assert sftkey_metrics(trainer.evaluate(first, metric_key_prefix="test"), "test_") == pytest.approx(alone["first"])
    assert sftkey_metrics(trainer.evaluate(second), "eval_") == pytest.approx(alone["second"])
    assert sftkey_metrics(trainer.predict(first).metrics, "test_") == pytest.approx(alone["first"])
    assert sftkey_metrics(trainer.evaluate(second), "eval_") == pytest.approx(alone["second"])
    logged = {k for h in trainer.state.log_history for k in h if "sftkey/" in k}
    assert logged and all(k.startswith(("eval_", "test_")) for k in logged)

    class EvaluateMidway(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if state.global_step == 2:  # between step 2's log and step 3
                midway.evaluate(metric_key_prefix="mid")

    plain, midway = build(tmp_path / "plain"), build(tmp_path / "mid", [EvaluateMidway()])
    plain.train()
    midway.train()
    train_logs = [
        {k: v for k, v in h.items() if k.startswith("sftkey/")} for h in plain.state.log_history if "loss" in h
    ]
    assert [
        {k: v for k, v in h.items() if k.startswith("sftkey/")} for h in midway.state.log_history if "loss" in h
    ] == (train_logs)
    assert len(train_logs) == 3 and all("sftkey/key_loss" in h for h in train_logs)
    (mid,) = [h for h in midway.state.log_history if "mid_loss" in h]
    assert mid["mid_sftkey/key_loss"] > 0 and "sftkey/key_loss" not in mid


def test_sftkey_off_leaves_the_trainer_stock(tiny_dir, tmp_path):
    records = arithmetic_records(8, seed=11, form="prompt_completion")
    trainer = trainer_for(tiny_dir, records, tmp_path / "off", sftkey=False, max_steps=2)
    assert "sftkey_mask" not in trainer.train_dataset.column_names
    assert not any(isinstance(cb, SFTKeyCallback) for cb in trainer.callback_handler.callbacks)
    trainer.train()
    stock = trainer_for(tiny_dir, records, tmp_path / "stock", trl.SFTTrainer, max_steps=2)
    stock.train()
    assert losses(trainer) == losses(stock)
    assert not any(key.startswith("sftkey/") for h in trainer.state.log_history for key in h)


@pytest.mark.parametrize(
    "settings",
    [
        {"sftkey_mode": "two_stage", "sftkey_stage2_steps": 2},
        {"sftkey_mode": "key_only"},
        {"sftkey_mode": "weighted", "sftkey_key_weight": 2.0},
    ],
)
def test_callback_on_a_stock_sfttrainer_trains_as_sftkey_trainer(tiny_dir, tmp_path, settings):
    """``trl.SFTTrainer(..., callbacks=[SFTKeyCallback(...)])`` with a plain ``SFTConfig``: the same losses, weights
    and ``sftkey/*`` metrics, bit for bit, as ``SFTKeyTrainer`` with those settings."""
    records = arithmetic_records(16, seed=6, form="prompt_completion")
    per_token = PER_TOKEN  # the metrics compared need per-token losses (and weighted mode needs them to train)
    reference = trainer_for(tiny_dir, records, tmp_path / "ref", sftkey=True, max_steps=4, **settings, **per_token)
    reference.train()
    callback = SFTKeyCallback(SFTKeyArguments(sftkey=True, **settings))
    stock = trainer_for(
        tiny_dir, records, tmp_path / "cb", trl.SFTTrainer, callbacks=[callback], config_cls=trl.SFTConfig,
        max_steps=4, **per_token,
    )  # fmt: skip
    assert type(stock) is trl.SFTTrainer and not hasattr(stock.args, "sftkey")
    stock.train()
    assert stock.sftkey_callback is callback and callback.data_stats[0].found == 16
    metrics = sorted({key for h in reference.state.log_history for key in h if key.startswith("sftkey/")})
    assert {"sftkey/stage", "sftkey/key_loss", "sftkey/key_weight"} <= set(metrics)
    assert losses(stock) == losses(reference)
    for key in metrics:  # stage-2 steps log no reasoning loss
        assert [h.get(key) for h in stock.state.log_history] == [h.get(key) for h in reference.state.log_history]
    if settings["sftkey_mode"] == "two_stage":
        assert logged(stock, "sftkey/stage") == [1, 1, 2, 2]
    for (name, p), q in zip(reference.model.named_parameters(), stock.model.parameters()):
        assert torch.equal(p, q), name


def test_callback_refuses_what_it_cannot_train_before_the_first_step(tiny_dir, tmp_path):
    records = arithmetic_records(8, seed=6, form="prompt_completion")

    def stock(arguments, **overrides):
        callbacks = [SFTKeyCallback(SFTKeyArguments(sftkey=True, **arguments))]
        return trainer_for(
            tiny_dir, records, tmp_path, trl.SFTTrainer, callbacks=callbacks, config_cls=trl.SFTConfig, **overrides
        )

    refusals = [
        (stock({"sftkey_on_missing": "drop"}), "cannot drop rows"),
        (stock({}, max_length=24), "reach max_length=24"),  # SFTTrainer cut rows before the callback saw them
        (stock({"sftkey_finder": "boxed"}), "below sftkey_min_found"),  # no \boxed{} answer in these records
        # an SFTKey trainer whose config turned SFTKey off is not quietly trained as plain SFT either
        (trainer_for(tiny_dir, records, tmp_path, callbacks=[SFTKeyCallback()], sftkey=False), "set sftkey=True"),
    ]
    if not FUSED_HEAD:  # trl 1.9's default chunked_nll has no per-token losses to weigh
        refusals.append((stock({"sftkey_mode": "weighted", "sftkey_key_weight": 3.0}), "loss_type='nll'"))
    for trainer, message in refusals:
        with pytest.raises(ValueError, match=message):
            trainer.train()
        assert trainer.state.global_step == 0


def test_unsupported_settings_are_refused(tiny_dir, tmp_path):
    records = arithmetic_records(4, seed=12, form="prompt_completion")
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        trainer_for(tiny_dir, records, tmp_path, sftkey=True, label_smoothing_factor=0.1)
    # refused before the data is prepared: these records would fail in tokenisation
    unreadable = [{"prompt": "Say hi.", "completion": 5}] * 4
    with pytest.raises(ValueError, match="use_liger_kernel=False"):
        trainer_for(tiny_dir, unreadable, tmp_path, sftkey=True, use_liger_kernel=True)
    if not FUSED_HEAD:  # trl 1.9's default chunked_nll returns no per-token losses to weigh (1.0/1.0 needs none)
        with pytest.raises(ValueError, match="loss_type='nll'"):
            trainer_for(tiny_dir, records, tmp_path, sftkey=True, sftkey_mode="weighted", sftkey_key_weight=3.0)


def test_yaml_config_through_trl_parser(tmp_path):
    import yaml
    from trl import TrlParser

    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path),
                "bf16": False,
                "sftkey": True,
                "sftkey_mode": "weighted",
                "sftkey_finder": "regex",
                "sftkey_finder_options": {"pattern": "#### (?P<key>.+)"},
                "sftkey_key_weight": 4.0,
            }
        )
    )
    (args,) = TrlParser((SFTKeyConfig,)).parse_args_and_config(["--config", str(path)])
    assert (args.sftkey, args.sftkey_mode, args.sftkey_key_weight) == (True, "weighted", 4.0)
    assert args.sftkey_finder_options == {"pattern": "#### (?P<key>.+)"}
    with pytest.raises(ValueError, match="sftkey_on_missing must be one of"):
        SFTKeyConfig(output_dir=str(tmp_path), bf16=False, sftkey=True, sftkey_on_missing="ignore")
