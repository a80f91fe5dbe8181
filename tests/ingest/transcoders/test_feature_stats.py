"""Feature statistics against brute force on a real tiny model: distinct top examples,
the held BOS position, refusals (NaN, bad flags, windows longer than the context)."""

import json

import pytest
import torch

from ingest.errors import InvalidArgumentError
from ingest.models import adapter_from_hf
from ingest.transcoders.feature_stats import compute_feature_stats, context_keys
from ingest.transcoders.sources import PromptSource
from tests.ingest.transcoders.helpers import (
    make_set,
    random_stream_source,
    tiny_adapter,
    tiny_gpt2,
)

pytestmark = pytest.mark.unit

CONTEXT = 8


def _prompts(n: int, prefix: list[int], seed: int, length: int = 6) -> list[list[int]]:
    """``n`` prompts: ``prefix`` then ``length`` random tokens from 8..39."""
    gen = torch.Generator().manual_seed(seed)
    return [prefix + torch.randint(8, 40, (length,), generator=gen).tolist() for _ in range(n)]


def _brute_force(adapter, tset, source, n_windows):
    """Per (layer, latent): density, max and every distinct context's best activation
    (> 0), sorted, over the counted tokens (real, not a leading BOS)."""
    windows = source.get("eval", 0, n_windows)
    counted = windows.mask.clone()
    if adapter.bos_token_id is not None:
        counted[:, 0] &= windows.ids[:, 0] != adapter.bos_token_id
    held = windows.mask[:, 0] & ~counted[:, 0]  # (n,) windows whose BOS is not counted
    mlp_in, _ = adapter.mlp_sites(windows.ids, tset.layers)
    out = {}
    with torch.no_grad():
        for layer, x in zip(tset.layers, mlp_in, strict=True):
            acts = tset.encode(layer, x)  # (n, T, d_t)
            for i in range(tset.d_transcoder):
                best: dict[tuple[int, ...], float] = {}
                for w, t in counted.nonzero().tolist():
                    v = float(acts[w, t, i])
                    shown = tuple(windows.ids[w, max(0, t - CONTEXT) : t + 1].tolist())
                    if v > 0 and v > best.get(shown, 0.0):
                        best[shown] = v
                values = acts[..., i][counted]
                out[layer, i] = {
                    "density": float((values > 0).double().mean()),
                    "max": max(float(values.max()), 0.0),
                    "contexts": sorted(best.values(), reverse=True),
                    "at_bos": float(acts[held, 0, i].max()) if bool(held.any()) else 0.0,
                }
    return out


def _stats(adapter, tset, source, **kw):
    args = dict(n_windows=source.n_windows("eval"), batch_size=8, top_k=3, context=CONTEXT)
    args.update(kw)
    return {
        (s["layer"], s["index"]): s for s in compute_feature_stats(adapter, tset, source, **args)
    }


def test_context_keys_are_equal_exactly_for_equal_shown_contexts():
    ids = torch.tensor([[5, 6, 7, 8], [9, 6, 7, 8], [6, 7, 8, 1]])
    keys = context_keys(ids, context=2)
    assert int(keys[0, 3]) == int(keys[1, 3])  # (6, 7, 8) both
    assert int(keys[0, 2]) != int(keys[1, 2])  # (5, 6, 7) vs (9, 6, 7)
    # (6, 7, 8) at the third position, a context cut by the window's start: (6,) vs (6, 7)
    assert int(keys[2, 2]) == int(keys[0, 3])
    assert int(keys[2, 0]) != int(keys[0, 1]) and bool((keys >= 0).all())


def test_top_examples_are_distinct_contexts_even_when_one_repeats_in_every_window():
    adapter = tiny_adapter()
    tset = make_set(n_layers=2, fingerprint="")
    # 48 windows share their first three tokens: each of those contexts repeats in more
    # than 4 x top_k windows, and a latent strongest there used to get one or two examples
    eval_prompts = _prompts(48, [5, 6, 7], seed=1)
    source = PromptSource("shared prefix", _prompts(4, [5, 6, 7], seed=2), eval_prompts)
    top_k = 3
    stats = _stats(adapter, tset, source, top_k=top_k)
    expected = _brute_force(adapter, tset, source, 48)
    for key, s in stats.items():
        got = [e["activation"] for e in s["top_examples"]]
        want = expected[key]["contexts"][:top_k]
        assert got == pytest.approx(want, rel=1e-5), key
        assert len({e["context"] for e in s["top_examples"]}) == len(got)


def test_a_leading_bos_is_not_counted_as_attribution_holds_it_at_zero():
    adapter = tiny_adapter()
    adapter.bos_token_id = 0  # the loader sets it from the checkpoint's config
    tset = make_set(n_layers=2, fingerprint="")
    # half the windows start with BOS, half with another token (counted there)
    eval_prompts = _prompts(12, [0], seed=3) + _prompts(12, [5], seed=4)
    source = PromptSource("bos", _prompts(4, [0], seed=5), eval_prompts)
    # layer 0's latent 0 reads the BOS position's MLP input: strongest there
    with torch.no_grad():
        x_bos = adapter.mlp_sites(torch.tensor([[0]]), [0])[0][0][0, 0]
        tset.W_enc(0)[0].copy_(x_bos)
    stats = _stats(adapter, tset, source, top_k=4)
    expected = _brute_force(adapter, tset, source, 24)
    assert expected[0, 0]["at_bos"] > expected[0, 0]["max"] > 0
    assert sum(e["at_bos"] > 0 for e in expected.values()) > 1
    for key, s in stats.items():
        assert s["density"] == pytest.approx(expected[key]["density"]), key
        assert s["max_activation"] == pytest.approx(expected[key]["max"], rel=1e-5), key
        for example in s["top_examples"]:
            assert example["position"] > 0 or eval_prompts[example["window"]][0] != 0


def test_windows_of_bos_alone_are_refused_not_written_as_zeros():
    adapter = tiny_adapter()
    adapter.bos_token_id = 0
    source = PromptSource("only bos", [[0], [0]], [[0], [0]])
    with pytest.raises(InvalidArgumentError, match="no token to count"):
        compute_feature_stats(adapter, make_set(n_layers=2, fingerprint=""), source)


def test_nan_activations_are_refused_naming_the_layer():
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.bias[0] = float("nan")
    adapter = adapter_from_hf(model)
    with pytest.raises(InvalidArgumentError, match=r"non-finite.*MLP input.*layer 1"):
        compute_feature_stats(
            adapter, make_set(n_layers=2, fingerprint=""), random_stream_source(), n_windows=4
        )


def test_max_activation_does_not_depend_on_top_k_and_bad_counts_name_the_flag():
    adapter, tset = tiny_adapter(), make_set(n_layers=2, fingerprint="")
    source = random_stream_source()
    expected = _brute_force(adapter, tset, source, 8)
    for top_k in (0, 1, 5):
        stats = _stats(adapter, tset, source, n_windows=8, top_k=top_k)
        assert any(s["max_activation"] > 0 for s in stats.values())
        for key, s in stats.items():
            assert s["max_activation"] == pytest.approx(expected[key]["max"], rel=1e-5), key
            assert s["density"] == pytest.approx(expected[key]["density"]), key
            assert len(s["top_examples"]) == min(top_k, len(expected[key]["contexts"]))
    with pytest.raises(InvalidArgumentError, match="--top-k"):
        compute_feature_stats(adapter, tset, source, top_k=-1)
    for windows in (0, -3):
        with pytest.raises(InvalidArgumentError, match="--windows"):
            compute_feature_stats(adapter, tset, source, n_windows=windows)


def test_windows_longer_than_the_model_context_name_the_flag():
    adapter = tiny_adapter()
    source = random_stream_source(context_len=adapter.n_ctx + 1)
    with pytest.raises(InvalidArgumentError, match=rf"--context-len {adapter.n_ctx} or less"):
        compute_feature_stats(adapter, make_set(n_layers=2, fingerprint=""), source)


@pytest.mark.slow
def test_stats_cli_refuses_bad_counts_and_keeps_the_old_catalog(tiny_zoo_dir, tmp_path, capsys):
    from ingest.models import load_model
    from ingest.transcoders.formats import save
    from ingest.transcoders.transcoder import Transcoder
    from ingest.transcoders.transcoder_set import SetMetadata, TranscoderSet
    from service.cli import main
    from tests.ingest.transcoders.helpers import config, randomize

    adapter = load_model(str(tiny_zoo_dir)).adapter
    cfg = config("relu", d=adapter.d_model)
    meta = SetMetadata(
        kind="transcoder", model_id="tiny", model_fingerprint=adapter.fingerprint(),
        n_layers=adapter.n_layers, d_model=adapter.d_model, layers=[0], config=cfg,
    )  # fmt: skip
    module = Transcoder(cfg)
    randomize(module)
    out = tmp_path / "set"
    save(TranscoderSet(meta, {0: module}), out)
    catalog = out / "feature_stats.json"
    catalog.write_text('[{"kept": true}]')
    stats = ["transcoders", "stats", str(out), "--model", str(tiny_zoo_dir)]
    for flags, flag in ((["--windows", "0"], "--windows"), (["--top-k", "-2"], "--top-k")):
        assert main([*stats, *flags]) == 2
        assert flag in capsys.readouterr().err
        assert json.loads(catalog.read_text()) == [{"kept": True}]
    # too long a window for the model's context: the flag is named
    n_ctx = adapter.n_ctx
    words = tmp_path / "words.txt"
    words.write_text(" ".join(["the"] * 40 * n_ctx))
    text = ["--prompts", f"text:{words}", "--context-len", str(n_ctx + 1)]
    assert main([*stats, *text]) == 2
    assert f"--context-len {n_ctx} or less" in capsys.readouterr().err
    assert main([*stats, "--windows", "4", "--top-k", "0"]) == 0
    written = json.loads(catalog.read_text())
    assert len(written) == 16 and any(s["max_activation"] > 0 for s in written)
    assert all(s["top_examples"] == [] for s in written)


@pytest.mark.parametrize("kind", ["transcoder", "clt"])
def test_token_readings_go_through_the_norms_as_the_model_does(kind):
    """De-embedding and output tokens through HF's own LayerNorms (random weights and
    biases): a token's embedding as layer l's ln_2 makes of it, bias removed and the
    denominator taken out, read by the encoder; a latent's decoders (all of a CLT's) as
    ln_f makes of them, read by the unembedding."""
    torch.manual_seed(3)
    hf = tiny_gpt2(vocab=40, n_layers=2)
    with torch.no_grad():
        for ln in [*(b.ln_2 for b in hf.transformer.h), hf.transformer.ln_f]:
            ln.weight.copy_(torch.rand_like(ln.weight) * 3 - 1)  # some negative
            ln.bias.copy_(torch.randn_like(ln.bias))
    adapter = adapter_from_hf(hf)
    tset = make_set(kind=kind, n_layers=2, fingerprint="")
    source = PromptSource("random", _prompts(4, [], seed=2), _prompts(8, [], seed=4))
    top = 5
    stats = _stats(adapter, tset, source, top_tokens=top)

    def through(ln, v):
        """What ``ln`` makes of each row of ``v``, without its bias or denominator."""
        sigma = (v.var(-1, keepdim=True, unbiased=False) + ln.eps).sqrt()
        return (ln(v) - ln.bias) * sigma

    E, W_U = hf.transformer.wte.weight, hf.lm_head.weight
    with torch.no_grad():
        for layer in tset.layers:
            reads = through(hf.transformer.h[layer].ln_2, E) @ tset.W_enc(layer).T  # (V, d_t)
            decoders = sum(tset.W_dec(layer, t) for t in tset.targets(layer))
            writes = through(hf.transformer.ln_f, decoders) @ W_U.T  # (d_t, V)
            for i in range(tset.d_transcoder):
                s = stats[layer, i]
                want_in = reads[:, i].topk(top)
                want_out = writes[i].topk(top)
                assert [t["id"] for t in s["top_tokens"]] == want_in.indices.tolist()
                assert [t["score"] for t in s["top_tokens"]] == pytest.approx(
                    want_in.values.tolist(), rel=1e-4, abs=1e-5
                )
                assert [t["id"] for t in s["output_tokens"]] == want_out.indices.tolist()
                assert [t["score"] for t in s["output_tokens"]] == pytest.approx(
                    want_out.values.tolist(), rel=1e-4, abs=1e-5
                )


def test_examples_are_the_same_when_latents_are_taken_a_few_at_a_time(monkeypatch):
    from ingest.transcoders import feature_stats

    adapter = tiny_adapter()
    tset = make_set(n_layers=2, fingerprint="")
    source = PromptSource(
        "shared prefix", _prompts(4, [5, 6], seed=2), _prompts(24, [5, 6], seed=5)
    )
    whole = _stats(adapter, tset, source)
    # 3 latents a chunk: positions per batch are 8 windows x 8 tokens at most
    monkeypatch.setattr(feature_stats, "_CHUNK_ENTRIES", 3 * 8 * 8)
    chunked = _stats(adapter, tset, source)
    assert tset.d_transcoder > 3 and chunked == whole


def test_catalog_records_from_stats_rows_keep_each_list_in_its_field():
    """FeatureRecord.from_stats: top_tokens are the tokens the feature fires on (its top
    examples', distinct, strongest first), de_embedding_tokens the row's de-embedding
    ("top_tokens" in the stats file), output_tokens the row's; a hand-built record with
    token dicts is refused before it reaches the store."""
    from ingest.graph import FeatureRecord

    adapter = tiny_adapter()
    tset = make_set(n_layers=2, fingerprint="")
    source = PromptSource("random", _prompts(4, [], seed=3), _prompts(24, [], seed=4))
    rows = compute_feature_stats(
        adapter, tset, source, n_windows=24, batch_size=8, top_k=4, context=CONTEXT,
        tokenizer=None,
    )  # fmt: skip
    firing = [r for r in rows if len({e["token"] for e in r["top_examples"]}) > 1]
    assert firing
    for row in rows:
        record = FeatureRecord.from_stats(row, "set@abc")
        assert (record.set_id, record.layer, record.index) == (
            "set@abc",
            row["layer"],
            row["index"],
        )
        tokens = [e["token"] for e in row["top_examples"]]
        assert record.top_tokens == list(dict.fromkeys(tokens))
        assert record.de_embedding_tokens == [t["token"] for t in row["top_tokens"]]
        assert record.output_tokens == [t["token"] for t in row["output_tokens"]]
        assert record.top_examples == row["top_examples"]
    with pytest.raises(InvalidArgumentError, match="top_tokens must be a list of token strings"):
        FeatureRecord("set@abc", 0, 1, top_tokens=[{"id": 3, "token": "x"}])  # type: ignore[list-item]
