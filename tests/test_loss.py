"""The core's loss pieces on plain tensors: the weighted path's memory bound and its weights."""

from __future__ import annotations

import pytest
import torch

from sftkey_plugin.loss import excess_weights, is_top1_where, per_token_nll, selected_token_nll, weight_sum


def saved_bytes(function, *args) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of ``function(*args)`` (each storage once: two
    backward nodes often keep the same tensor)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function(*args).sum().backward()
    return sum(storages.values())


def test_weighted_correction_keeps_only_the_reweighted_rows():
    """On the full-logits route the correction's graph holds the rows of tokens whose weight is not 1 (float32),
    not the whole (batch, sequence, vocabulary) logits: 8 of 2x256 positions here."""
    batch, length, vocab = 2, 256, 4096
    logits = torch.randn(batch, length, vocab, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length))
    selected = torch.zeros(batch, length - 1, dtype=torch.bool)
    selected[0, 10:14] = selected[1, 200:204] = True
    rows = int(selected.sum())
    kept = saved_bytes(selected_token_nll, logits, labels, selected)
    assert kept <= rows * vocab * 4 + 4096  # one float32 row of log-probabilities per selected token, and indices
    everything = saved_bytes(per_token_nll, logits, labels)
    assert everything >= batch * (length - 1) * vocab * 4  # what recomputing every token's NLL would keep
    print(f"\ngraph of the correction: {kept / 2**20:.2f} MiB for {rows} tokens, {everything / 2**20:.1f} MiB for all")


def test_selected_token_nll_equals_the_full_computation_there():
    logits = torch.randn(2, 9, 11)
    labels = torch.randint(0, 11, (2, 9))
    labels[1, 4] = -100
    selected = torch.rand(2, 8) > 0.5
    selected[1, 3] = False  # label 4 is ignored
    assert torch.allclose(selected_token_nll(logits, labels, selected), per_token_nll(logits, labels)[selected])


def test_per_token_nll_is_the_next_token_cross_entropy():
    """Shifting the labels instead of the logits (no copy of the logits) gives the textbook shifted cross-entropy."""
    logits = torch.randn(3, 7, 13)
    labels = torch.randint(0, 13, (3, 7))
    labels[0, :3] = labels[2, 5] = -100
    reference = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none"
    ).view(3, 6)
    assert torch.equal(per_token_nll(logits, labels), reference)
    assert torch.equal(per_token_nll(logits, labels, chunk_elements=13 * 4), reference)  # several chunks


def test_is_top1_where_decides_the_selected_tokens_only():
    logits = torch.randn(2, 6, 5)
    labels = torch.randint(0, 5, (2, 6))
    labels[0, 2] = int(logits[0, 1].argmax())  # one certain hit, one certain miss
    labels[1, 4] = int(logits[1, 3].argmin())
    selected = torch.rand(2, 5) > 0.4
    selected[0, 1] = selected[1, 3] = True
    top1 = is_top1_where(logits, labels, selected)
    assert torch.equal(top1, (logits[:, :-1].argmax(-1) == labels[:, 1:]) & selected)
    assert top1[0, 1] and not top1[1, 3]


@pytest.mark.parametrize(("key_weight", "other_weight"), [(3.0, 0.5), (1.0, 1.0), (2.0, 0.0)])
def test_weights(key_weight, other_weight):
    mask = torch.tensor([[0, 1, 1, 0, 1]])
    trained = torch.tensor([[True, True, False, True, True]])
    excess = excess_weights(mask, key_weight, other_weight)
    expected = torch.tensor([[other_weight, key_weight, key_weight, other_weight, key_weight]]) - 1
    assert torch.equal(excess, expected)
    assert float(weight_sum(mask, trained, key_weight, other_weight)) == 2 * key_weight + 2 * other_weight
