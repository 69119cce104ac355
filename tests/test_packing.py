"""Packing: documents share rows with positions restarting at 0; attention never crosses a document boundary
and the loss and gradients of a packed batch equal those of the same documents unpacked."""
import pytest
import torch
from train_helpers import VOCAB_SIZE, tiny_llama, variable_length_lm_data

from minilora.data import Collator
from minilora.data.packing import pack
from minilora.models.masks import document_ids, restrict_to_documents, same_document_mask


def _documents(n=6, seed=0):
    return [(row["input_ids"], row["labels"]) for row in variable_length_lm_data(n, seed=seed)]


def test_pack_keeps_documents_whole_with_their_own_positions():
    docs = _documents(9)
    rows = pack(docs, 20)
    assert all(len(r["input_ids"]) <= 20 for r in rows) and len(rows) < len(docs)
    found = []
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for a, b in zip(starts, starts[1:], strict=False):
            assert row["position_ids"][a:b] == list(range(b - a))
            assert row["labels"][a] == -100  # the first token of a document is never a target
            found.append((row["input_ids"][a:b], row["labels"][a + 1:b]))
    assert sorted(found) == sorted((ids, labels[1:]) for ids, labels in docs)
    with pytest.raises(ValueError, match="longer than max_length=4"):
        pack(docs, 4)


def test_document_mask_is_block_diagonal():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert document_ids(positions).tolist() == [[1, 1, 1, 2, 2, 3], [1, 1, 1, 1, 1, 1]]
    mask = restrict_to_documents(None, positions, past_len=0)[:, 0]
    expected_first = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                                   [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask[0], expected_first) and torch.equal(mask[1], torch.ones(6, 6).tril().bool())
    assert same_document_mask(torch.arange(6)[None]) is None  # nothing packed: SDPA's causal fast path
    assert restrict_to_documents(None, positions, past_len=3) is None  # a cached continuation: untouched


@pytest.mark.parametrize("grad", [True, False], ids=["train-kernel", "sdpa"])
def test_no_attention_crosses_a_document_boundary(grad):
    """Changing every token of one document changes no logit of the others in the same row."""
    model = tiny_llama()
    row = pack(_documents(3), 64)
    assert len(row) == 1
    batch = Collator()(row)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    other = batch["input_ids"].clone()
    middle = slice(starts[1], starts[2])
    other[0, middle] = (other[0, middle] + 7 - 4) % (VOCAB_SIZE - 4) + 4  # every token of the middle document
    with torch.set_grad_enabled(grad):
        for p in model.parameters():
            p.requires_grad_(grad)
        a = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"]).logits
        b = model(other, batch["attention_mask"], batch["position_ids"]).logits
    outside = torch.ones(a.shape[1], dtype=torch.bool)
    outside[starts[1]:starts[2]] = False
    assert torch.equal(a[0, outside], b[0, outside])
    assert not torch.allclose(a[0, ~outside], b[0, ~outside])  # the changed document itself does change


@pytest.mark.parametrize("padded_rows", [False, True])
def test_packed_loss_and_gradients_equal_unpacked(padded_rows):
    docs = _documents(8, seed=2)
    unpacked = Collator()([{"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}
                           for ids, labels in docs])
    packed = Collator()(pack(docs, 40 if padded_rows else 200))
    assert packed["input_ids"].shape[0] == (1 if not padded_rows else packed["input_ids"].shape[0])
    results = []
    for batch in (unpacked, packed):
        model = tiny_llama()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        with torch.no_grad():  # the inference path (SDPA) agrees too
            results[-1] += (model(**batch).loss,)
    (loss_a, grads_a, eval_a), (loss_b, grads_b, eval_b) = results
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(eval_b, eval_a, atol=1e-5, rtol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=0, msg=name)


def test_training_on_packed_rows_equals_training_on_the_documents(tmp_path):
    """Through `ml.train`: one step on one packed row == one step on the same documents as a padded batch."""
    import json

    from train_helpers import tiny_lora_llama

    from minilora.train.loop import train
    from minilora.train.config import TrainConfig

    docs = _documents(6, seed=4)
    unpacked = [{"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)} for ids, labels in docs]
    packed = pack(docs, 200)
    assert len(packed) == 1
    runs = []
    for name, data in (("unpacked", unpacked), ("packed", packed)):
        model = tiny_lora_llama()
        train(model, data, TrainConfig(output_dir=str(tmp_path / name), batch_size=len(data), max_steps=1,
                                       shuffle=False, progress_bar=False, plot=False, learning_rate=1e3,
                                       adam_beta1=0.0, adam_beta2=0.0, adam_epsilon=1e3, max_grad_norm=None))
        record = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
        runs.append((record, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}))
    (a, params_a), (b, params_b) = runs
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], abs=1e-5)
    for name in params_a:
        torch.testing.assert_close(params_b[name], params_a[name], atol=1e-5, rtol=0, msg=name)
