"""The activation buffer stays bounded, resumes exactly and rejects NaNs; prompt sources."""

import importlib.util
import json

import pytest
import torch

from ingest.errors import InvalidArgumentError, NotFoundError, UnavailableError
from ingest.models import adapter_from_hf
from ingest.transcoders.buffer import ActivationBuffer, check_finite, collect
from ingest.transcoders.sources import hf_dataset_source, resolve_source
from tests.ingest.transcoders.helpers import (
    D_MODEL,
    random_prompt_source,
    random_stream_source,
    tiny_adapter,
    tiny_gpt2,
    word_tokenizer,
)

pytestmark = pytest.mark.unit


def _buffer(adapter, source, **kw):
    args = dict(capacity_rows=64, batch_size=16, seed=0, model_batch_size=2)
    args.update(kw)
    return ActivationBuffer(adapter, source, [0, 1], **args)


def test_buffer_memory_is_bounded_over_many_refills():
    adapter, source = tiny_adapter(), random_stream_source(n_tokens=2048)
    buffer = _buffer(adapter, source)
    pointers = (buffer._x.data_ptr(), buffer._y.data_ptr())
    assert buffer.nbytes == 2 * 2 * 64 * D_MODEL * 4
    for _ in range(40):
        x, y, weight = buffer.next_batch()
        assert x.shape == y.shape == (2, 16, D_MODEL) and weight is None
    assert buffer.refill_index >= 9  # 4 batches per refill of 64 rows
    assert buffer.nbytes == 2 * 2 * 64 * D_MODEL * 4
    assert (buffer._x.data_ptr(), buffer._y.data_ptr()) == pointers


def test_buffer_rows_are_the_model_activations_and_sae_shares_storage():
    adapter, source = tiny_adapter(), random_stream_source(n_tokens=2048)
    sae = _buffer(adapter, source, input_site="mlp_out")
    x, y, _ = sae.next_batch()
    assert torch.equal(x, y) and sae.nbytes == 2 * 64 * D_MODEL * 4
    ids = source.get("train", 0, sae.windows_per_refill).ids
    rec = adapter(ids, record=True)
    all_rows = rec.mlp_out[1].reshape(-1, D_MODEL)
    # Every drawn row is one of the refill's rows.
    gaps = (y[1][:, None, :] - all_rows[None]).abs().amax(-1)  # (16, 64)
    assert gaps.min(-1).values.max() < 1e-5


def test_buffer_state_resumes_the_same_batches():
    adapter, source = tiny_adapter(), random_stream_source(n_tokens=2048)
    a = _buffer(adapter, source)
    for _ in range(6):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(5)]
    b = _buffer(adapter, source)
    b.load_state_dict(state)
    for ex, got in zip(expected, [b.next_batch() for _ in range(5)], strict=True):
        assert torch.equal(ex[0], got[0]) and torch.equal(ex[1], got[1])


def test_a_split_that_fits_is_collected_once_and_reshuffled_every_epoch():
    adapter = tiny_adapter()
    source = random_stream_source(n_tokens=640, context_len=16)  # 36 train windows
    n_rows = source.n_windows("train") * 16
    buffer = _buffer(adapter, source, capacity_rows=1024)
    assert buffer.resident and buffer.capacity_rows == n_rows  # only what the split needs
    x0, _ = buffer.prime()
    rec = adapter(source.get("train", 0, source.n_windows("train")).ids, record=True)
    assert torch.allclose(x0[1], rec.mlp_in[1].reshape(-1, D_MODEL), atol=1e-6)
    collected = buffer.collect_seconds
    held = x0.clone()
    sample, _ = buffer.prime(max_rows=10)  # shuffled rows of the held ones, no model run
    assert sample.shape == (2, 10, D_MODEL)
    assert torch.equal(sample, held.index_select(1, buffer._perm[:10]))
    epochs = [torch.cat([buffer.next_batch()[0] for _ in range(n_rows // 16)], 1) for _ in range(3)]
    assert buffer.refill_index == 2 and buffer.collect_seconds == collected  # no model runs
    for epoch in epochs:
        # every held row exactly once per epoch, in a new order each time
        assert torch.equal(epoch[0].sort(0).values, held[0].sort(0).values)
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    # resuming mid-epoch re-collects once and continues with the same batches
    state = buffer.state_dict()
    expected = [buffer.next_batch() for _ in range(4)]
    resumed = _buffer(adapter, source, capacity_rows=1024)
    resumed.load_state_dict(state)
    for ex, got in zip(expected, [resumed.next_batch() for _ in range(4)], strict=True):
        assert torch.equal(ex[0], got[0]) and torch.equal(ex[1], got[1])


def test_windows_longer_than_the_context_name_the_flag():
    adapter = tiny_adapter()
    source = random_stream_source(context_len=adapter.n_ctx + 1)
    with pytest.raises(InvalidArgumentError, match=rf"--context-len {adapter.n_ctx} or less"):
        _buffer(adapter, source, capacity_rows=4096)


def test_answer_predicting_rows_carry_the_answer_weight():
    adapter, source = tiny_adapter(), random_prompt_source()
    buffer = _buffer(adapter, source, capacity_rows=4096, answer_weight=4.0)
    assert buffer.resident
    x0, _ = buffer.prime()  # every row in collection order
    weight = buffer._weight[: buffer.n_rows]
    windows = source.get("train", 0, source.n_windows("train"))
    lengths = windows.mask.sum(1)
    # one row per prompt weighs 4: the prompt's second-to-last token, which predicts the
    # answer; every other real token weighs 1
    assert int((weight == 4.0).sum()) == source.n_windows("train")
    assert int((weight == 1.0).sum()) == int(lengths.sum()) - source.n_windows("train")
    rec = adapter(windows.ids, record=True)
    rows = torch.arange(len(lengths))
    expected = rec.mlp_in[0][rows, lengths - 2]
    assert torch.allclose(x0[0][weight == 4.0], expected, atol=1e-6)
    # batches carry their rows' weights; the storage counts them
    _, _, w = buffer.next_batch()
    assert w is not None and w.shape == (16,) and set(w.tolist()) <= {1.0, 4.0}
    assert buffer.nbytes == 2 * 2 * buffer.capacity_rows * D_MODEL * 4 + buffer.capacity_rows * 4
    # a weight of 1 keeps no weights at all
    assert _buffer(adapter, source, capacity_rows=4096).next_batch()[2] is None


def test_buffer_rows_follow_the_memory_budget():
    from ingest.transcoders.buffer import rows_for_budget

    # 1 MiB over 2 layers of (input, target) float32 vectors of width 64: 1024 rows.
    assert rows_for_budget(1, n_layers=2, d_model=64) == 1024
    assert rows_for_budget(1, n_layers=2, d_model=64, sae=True) == 2048
    # one float more per row for the row weights
    assert rows_for_budget(1, n_layers=2, d_model=64, weighted=True) == 2**20 // (257 * 4)


@pytest.mark.parametrize(
    ("values", "finite"),
    [([1.0, 2.0], True), ([3e38, 3e38], True), ([1.0, float("nan")], False),
     ([float("inf"), 1.0], False), ([float("inf"), float("-inf")], False)],
)  # fmt: skip
def test_finite_check_flags_nan_and_inf_but_not_a_sum_that_overflows(values, finite):
    tensor = torch.tensor(values)
    if finite:
        check_finite(tensor, 0, "MLP input", "here")
    else:
        with pytest.raises(InvalidArgumentError, match="non-finite"):
            check_finite(tensor, 0, "MLP input", "here")


def test_nan_activations_name_the_layer():
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.bias[0] = float("nan")
    adapter = adapter_from_hf(model)
    buffer = _buffer(adapter, random_stream_source())
    with pytest.raises(InvalidArgumentError, match=r"non-finite.*layer 1"):
        buffer.next_batch()
    with pytest.raises(InvalidArgumentError, match="layer 1"):
        collect(adapter, random_stream_source(), [0, 1], n_windows=2)


def test_buffer_too_small():
    with pytest.raises(InvalidArgumentError, match="--buffer-mb or --buffer-rows"):
        _buffer(tiny_adapter(), random_stream_source(), capacity_rows=8)
    with pytest.raises(InvalidArgumentError, match="--buffer-mb or --buffer-rows"):
        _buffer(tiny_adapter(), random_stream_source(), batch_size=48)


def test_text_and_jsonl_sources(tmp_path):
    tok = word_tokenizer()
    words = [f"w{i % 30 + 2}" for i in range(400)]
    (tmp_path / "a.txt").write_text(" ".join(words[:200]) + "\n\n" + " ".join(words[200:]))
    lines = [json.dumps({"text": " ".join(words[i : i + 50])}) for i in range(0, 400, 50)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines))
    text = resolve_source(f"text:{tmp_path / 'a.txt'}", None, tok, context_len=16)
    jsonl = resolve_source(str(tmp_path / "a.jsonl"), None, tok, context_len=16)
    for source in (text, jsonl):
        first = source.get("train", 0, 3)
        assert first.ids.shape == (3, 16) and bool(first.mask.all())
        assert torch.equal(first.ids, source.get("train", 0, 3).ids)
        n = source.n_windows("train")
        assert torch.equal(source.get("train", n, 1).ids, first.ids[:1])  # wraps around
        assert source.n_windows("eval") >= 1
    assert text.get("train", 0, 1).ids[0, 0] == tok.get_vocab()["w2"]


def test_source_errors(tmp_path):
    tok = word_tokenizer()
    (tmp_path / "bad.jsonl").write_text('{"text": "w2 w3"}\n{"body": "w4"}\n')
    with pytest.raises(InvalidArgumentError, match=r"bad\.jsonl:2.*'text'"):
        resolve_source(f"jsonl:{tmp_path / 'bad.jsonl'}", None, tok, context_len=1)
    with pytest.raises(NotFoundError):
        resolve_source(f"text:{tmp_path / 'missing.txt'}", None, tok)
    with pytest.raises(InvalidArgumentError, match="unknown prompt source"):
        resolve_source("s3://bucket", None, tok)
    with pytest.raises(InvalidArgumentError, match="zoo model directory"):
        resolve_source("zoo", tmp_path, tok)


def test_hf_dataset_without_package_or_hub_is_unavailable():
    # Either the package is missing or the hub is unreachable from the build machines.
    expected = "not installed" if importlib.util.find_spec("datasets") is None else "hub"
    with pytest.raises(UnavailableError, match=expected):
        hf_dataset_source("circuitscope/does-not-exist", word_tokenizer(), 16, max_tokens=100)
