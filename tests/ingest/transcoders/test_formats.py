"""Round trips of every architecture through every format, and layout errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ingest.errors import InvalidArgumentError, NotFoundError
from ingest.transcoders.formats import detect_format, load_any, save
from tests.ingest.transcoders.helpers import D_MODEL, D_T, assert_sets_equal, make_set

pytestmark = pytest.mark.unit

ARCHS = ["relu", "topk", "jumprelu", "batchtopk"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("kind", ["transcoder", "sae", "clt"])
def test_circuit_tracer_round_trip_is_exact(tmp_path, arch, skip, kind):
    tset = make_set(kind, arch, skip)
    save(tset, tmp_path / "set")
    back = load_any(tmp_path / "set")
    assert detect_format(tmp_path / "set") == "circuit_tracer"
    assert_sets_equal(tset, back)
    x = torch.randn(5, D_MODEL)
    for layer in tset.layers:
        assert torch.equal(tset.encode(layer, x), back.encode(layer, x))


# The architecture names SAELens registers (sae_lens.saes); it has no TopK transcoder and
# no SAE with a skip connection.
SAELENS_ARCHITECTURES = {
    "standard", "topk", "jumprelu",
    "transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder",
}  # fmt: skip
SAELENS_CASES = [
    (kind, arch, skip)
    for kind in ("transcoder", "sae")
    for arch in ARCHS
    for skip in (False, True)
    if not (kind == "transcoder" and arch == "topk") and not (kind == "sae" and skip)
]


@pytest.mark.parametrize(("kind", "arch", "skip"), SAELENS_CASES)
def test_saelens_round_trip_is_exact(tmp_path, kind, arch, skip):
    tset = make_set(kind, arch, skip, layers=[0, 2])
    save(tset, tmp_path / "sl", "saelens")
    assert detect_format(tmp_path / "sl") == "saelens"
    assert_sets_equal(tset, load_any(tmp_path / "sl"))
    weights = load_file(str(tmp_path / "sl" / "layer_2" / "sae_weights.safetensors"))
    assert weights["W_enc"].shape == (D_MODEL, D_T)
    cfg = json.loads((tmp_path / "sl" / "layer_2" / "cfg.json").read_text())
    assert cfg["architecture"] in SAELENS_ARCHITECTURES
    assert torch.equal(weights["W_enc"], tset.W_enc(2).T)


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_round_trip_is_exact(tmp_path, skip):
    tset = make_set("transcoder", "topk", skip)
    save(tset, tmp_path / "sp", "sparsify")
    assert detect_format(tmp_path / "sp") == "sparsify"
    assert_sets_equal(tset, load_any(tmp_path / "sp"))


def test_foreign_circuit_tracer_set_without_native_metadata_infers_architecture(tmp_path):
    tset = make_set("transcoder", "jumprelu", skip=True)
    save(tset, tmp_path / "ct")
    (tmp_path / "ct" / "circuitscope.json").unlink()
    back = load_any(tmp_path / "ct")
    assert back.config.arch == "jumprelu" and back.config.skip
    assert back.metadata.model_fingerprint == ""
    x = torch.randn(4, D_MODEL)
    for layer in tset.layers:
        assert torch.equal(tset.reconstruct([x] * 3)[layer], back.reconstruct([x] * 3)[layer])


def test_the_input_hook_is_the_mlp_input_after_the_norms_weight(tmp_path, caplog):
    """mlp.hook_in, not TransformerLens' ln2.hook_normalized (before the weight and bias);
    our older sets named the latter for the same input and read back renamed, silently;
    a set from elsewhere that names it gets a warning."""
    import yaml

    tset = make_set("transcoder", "relu")
    save(tset, tmp_path / "ct")
    config = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    assert config["feature_input_hook"] == "mlp.hook_in"
    native_path = tmp_path / "ct" / "circuitscope.json"
    native = json.loads(native_path.read_text())
    native["feature_input_hook"] = "ln2.hook_normalized"
    native_path.write_text(json.dumps(native))
    config["feature_input_hook"] = "ln2.hook_normalized"
    (tmp_path / "ct" / "config.yaml").write_text(yaml.safe_dump(config))
    with caplog.at_level("WARNING"):
        assert load_any(tmp_path / "ct").metadata.feature_input_hook == "mlp.hook_in"
    assert "before the norm's weight" not in caplog.text
    native_path.unlink()
    with caplog.at_level("WARNING"):
        assert load_any(tmp_path / "ct").metadata.feature_input_hook == "ln2.hook_normalized"
    assert "before the norm's weight and bias" in caplog.text


def test_foreign_clt_infers_topk(tmp_path):
    tset = make_set("clt", "topk")
    save(tset, tmp_path / "clt")
    (tmp_path / "clt" / "circuitscope.json").unlink()
    back = load_any(tmp_path / "clt")
    assert back.config.arch == "topk" and back.config.k == tset.config.k
    x = [torch.randn(4, D_MODEL) for _ in range(3)]
    for a, b in zip(tset.reconstruct(x), back.reconstruct(x), strict=True):
        assert torch.equal(a, b)


def test_saelens_apply_b_dec_to_input_is_folded(tmp_path):
    tset = make_set("sae", "relu", layers=[1])
    save(tset, tmp_path / "sl", "saelens")
    cfg_path = tmp_path / "sl" / "layer_1" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["apply_b_dec_to_input"] = True
    del cfg["metadata"]["circuitscope"]
    cfg_path.write_text(json.dumps(cfg))
    back = load_any(tmp_path / "sl")
    x = torch.randn(6, D_MODEL)
    module = tset.module(1)
    expected = torch.relu((x - module.b_dec) @ module.W_enc.T + module.b_enc)
    torch.testing.assert_close(back.encode(1, x), expected)


def _foreign_saelens(tmp_path, tset, layer, **cfg_changes):
    """``tset`` saved for SAELens, its circuitscope metadata removed and ``cfg_changes``
    applied: a set as SAELens itself would have written it."""
    save(tset, tmp_path / "sl", "saelens")
    cfg_path = tmp_path / "sl" / f"layer_{layer}" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(cfg_changes)
    del cfg["metadata"]["circuitscope"]
    cfg_path.write_text(json.dumps(cfg))
    return tmp_path / "sl"


def test_saelens_rescale_acts_by_decoder_norm_is_folded(tmp_path):
    """SAELens (rescale_acts_by_decoder_norm): TopK of relu(pre * |W_dec rows|), then the
    activations divided by those norms before decoding."""
    tset = make_set("sae", "topk", layers=[0])
    module = tset.module(0)
    with torch.no_grad():
        module.W_dec.mul_(torch.rand(D_T, 1) * 3 + 0.1)  # rows of other norms than 1
    back = load_any(_foreign_saelens(tmp_path, tset, 0, rescale_acts_by_decoder_norm=True))
    x = torch.randn(6, D_MODEL)
    norms = module.W_dec.norm(dim=1)
    pre = torch.relu((x @ module.W_enc.T + module.b_enc) * norms)
    top = pre.topk(tset.metadata.config.k, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    expected = (acts / norms) @ module.W_dec + module.b_dec
    torch.testing.assert_close(back.decode(0, back.encode(0, x)), expected)


def test_saelens_negative_thresholds_read_as_saelens_applies_them(tmp_path):
    """SAELens' JumpReLU is relu(pre) * (pre > threshold): below 0 nothing fires."""
    tset = make_set("sae", "jumprelu", layers=[0])
    module = tset.module(0)
    with torch.no_grad():
        module.threshold.copy_(torch.linspace(-0.5, 0.5, D_T))
    back = load_any(_foreign_saelens(tmp_path, tset, 0))
    x = torch.randn(64, D_MODEL)
    pre = x @ module.W_enc.T + module.b_enc
    expected = torch.relu(pre) * (pre > module.threshold)
    torch.testing.assert_close(back.encode(0, x), expected)


def test_saelens_config_keeps_its_metadata_and_one_layer_reads_alone(tmp_path, caplog):
    tset = make_set("transcoder", "jumprelu", layers=[0, 1, 2])
    save(tset, tmp_path / "sl", "saelens")
    cfg = json.loads((tmp_path / "sl" / "layer_1" / "cfg.json").read_text())
    # without a version SAELens rebuilds metadata from the top level and drops the hooks
    assert cfg["metadata"]["sae_lens_version"] >= "6"
    assert cfg["metadata"]["hook_name"] == "blocks.1.mlp.hook_in"
    one = load_any(tmp_path / "sl" / "layer_1")
    assert one.layers == [1] and one.metadata.set_id == tset.metadata.set_id
    x = torch.randn(6, D_MODEL)
    torch.testing.assert_close(one.encode(1, x), tset.encode(1, x), rtol=0, atol=0)
    # SAELens saves a directory per layer: a set's directory holding only some reads as
    # those, with the rest named
    (tmp_path / "sl" / "layer_2" / "sae_weights.safetensors").unlink()
    with caplog.at_level("WARNING"):
        assert load_any(tmp_path / "sl").layers == [0, 1]
    assert "of a set of layers [0, 1, 2]" in caplog.text


def test_wrong_shape_names_file_and_tensor(tmp_path):
    tset = make_set("transcoder", "relu")
    save(tset, tmp_path / "ct")
    path = tmp_path / "ct" / "layer_1.safetensors"
    tensors = load_file(str(path))
    tensors["W_dec"] = torch.zeros(D_T, D_MODEL + 1)
    save_file(tensors, str(path))
    with pytest.raises(InvalidArgumentError, match=r"layer_1\.safetensors.*'W_dec'.*shape"):
        load_any(tmp_path / "ct")


@pytest.mark.parametrize("fmt", ["circuit_tracer", "saelens"])
def test_non_finite_weights_name_file_and_tensor(tmp_path, fmt):
    # a diverged run's weights: refused on reading, not evaluated to nan everywhere
    save(make_set("transcoder", "relu"), tmp_path / "set", fmt=fmt)
    path = sorted((tmp_path / "set").rglob("*.safetensors"))[-1]
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.startswith("W_enc"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(path))
    with pytest.raises(InvalidArgumentError, match=rf"{path.name}: tensor '{name}' holds nan"):
        load_any(tmp_path / "set")


def test_an_infinite_threshold_reads_as_a_latent_that_never_fires(tmp_path):
    tset = make_set("transcoder", "jumprelu")
    save(tset, tmp_path / "set")
    path = tmp_path / "set" / "layer_1.safetensors"
    tensors = load_file(str(path))
    tensors["activation_function.threshold"][0] = float("inf")
    save_file(tensors, str(path))
    back = load_any(tmp_path / "set")
    x = torch.randn(64, D_MODEL) * 100
    acts = back.encode(1, x)
    assert torch.isfinite(acts).all() and not acts[:, 0].any()


def test_missing_tensor_and_missing_file(tmp_path):
    tset = make_set("clt", "relu")
    save(tset, tmp_path / "clt")
    path = tmp_path / "clt" / "W_enc_1.safetensors"
    tensors = load_file(str(path))
    del tensors["b_enc_1"]
    save_file(tensors, str(path))
    with pytest.raises(InvalidArgumentError, match=r"W_enc_1\.safetensors has no tensor 'b_enc_1'"):
        load_any(tmp_path / "clt")
    save(tset, tmp_path / "clt2")
    (tmp_path / "clt2" / "W_dec_2.safetensors").unlink()
    with pytest.raises(NotFoundError, match=r"W_dec_2\.safetensors"):
        load_any(tmp_path / "clt2", fmt="circuit_tracer")


def test_not_a_set_and_unsupported_layouts(tmp_path):
    with pytest.raises(InvalidArgumentError, match="not a transcoder set"):
        load_any(tmp_path)
    with pytest.raises(InvalidArgumentError, match="cross-layer"):
        save(make_set("clt", "relu"), tmp_path / "x", "saelens")
    with pytest.raises(InvalidArgumentError, match="TopK"):
        save(make_set("transcoder", "relu"), tmp_path / "y", "sparsify")
    with pytest.raises(InvalidArgumentError, match=r"no TopK transcoder.*sparsify"):
        save(make_set("transcoder", "topk"), tmp_path / "z", "saelens")
    with pytest.raises(InvalidArgumentError, match=r"no skip connection.*circuit-tracer"):
        save(make_set("sae", "relu", skip=True), tmp_path / "z", "saelens")
    assert not (tmp_path / "z").exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.yaml").write_text("model_kind: something\n")
    with pytest.raises(InvalidArgumentError, match="model_kind"):
        load_any(tmp_path / "bad")


@pytest.mark.parametrize("kind", ["transcoder", "clt"])
def test_a_save_that_fails_leaves_the_set_as_it_was(tmp_path, kind):
    """Every file of a set is staged before any is moved into place: when writing one
    fails (here the metadata's temporary name is taken by a directory), the error names
    the file, the old set reads back unchanged, and no temporary file is left."""
    old, new = make_set(kind, "jumprelu", True), make_set(kind, "jumprelu", True)
    with torch.no_grad():
        for param in new.parameters():
            param.add_(1.0)
    save(old, tmp_path / "set")
    (tmp_path / "set" / "circuitscope.json.tmp").mkdir()
    with pytest.raises(InvalidArgumentError, match=r"circuitscope\.json"):
        save(new, tmp_path / "set")
    assert_sets_equal(old, load_any(tmp_path / "set"))
    left = sorted(p.name for p in (tmp_path / "set").iterdir() if p.name.endswith(".tmp"))
    assert left == ["circuitscope.json.tmp"]


@pytest.mark.parametrize(("fmt", "other"), [("saelens", "layer_2"), ("sparsify", "layers.2.mlp")])
def test_saving_over_another_sets_layers_is_refused(tmp_path, fmt, other):
    """A reader takes every layer directory as part of the set, so a set is not written
    beside layer directories it does not write; writing the same layers again is fine."""
    arch = "topk" if fmt == "sparsify" else "jumprelu"
    wide = make_set("transcoder", arch, False, layers=[0, 2])
    narrow = make_set("transcoder", arch, False, layers=[0])
    save(wide, tmp_path / "d", fmt)
    with pytest.raises(InvalidArgumentError, match=f"another set \\({other}\\)"):
        save(narrow, tmp_path / "d", fmt)
    assert_sets_equal(wide, load_any(tmp_path / "d"))
    save(wide, tmp_path / "d", fmt)
    assert_sets_equal(wide, load_any(tmp_path / "d"))


@pytest.mark.parametrize("fmt", ["circuit_tracer", "saelens", "sparsify"])
def test_unreadable_metadata_names_the_file(tmp_path, fmt):
    tset = make_set("transcoder", "topk" if fmt == "sparsify" else "jumprelu", False)
    save(tset, tmp_path / "d", fmt)
    path = {
        "circuit_tracer": tmp_path / "d" / "circuitscope.json",
        "saelens": tmp_path / "d" / "layer_0" / "cfg.json",
        "sparsify": tmp_path / "d" / "layers.0.mlp" / "cfg.json",
    }[fmt]
    data = json.loads(path.read_text())
    meta = data if fmt == "circuit_tracer" else data.get("metadata", data)
    meta = meta.get("circuitscope", meta)
    meta["a_field_no_version_writes"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidArgumentError, match=f"{path}.*export the set again"):
        load_any(tmp_path / "d")


def test_a_cross_layer_set_off_layer_0_warns_and_reads_back_right(tmp_path, caplog):
    """circuit-tracer numbers a CLT's files by model layer from 0: a CLT over layers 1-2
    is written with a warning, and the native metadata reads it back on its layers."""
    tset = make_set("clt", "topk", False, layers=[1, 2], n_layers=4)
    with caplog.at_level("WARNING"):
        save(tset, tmp_path / "clt")
    assert "covers layers [1, 2]" in caplog.text
    back = load_any(tmp_path / "clt")
    assert back.layers == [1, 2]
    assert_sets_equal(tset, back)


def test_sparsify_coders_that_are_not_topk_mlp_coders_are_refused(tmp_path):
    tset = make_set("transcoder", "topk", layers=[0, 1])
    save(tset, tmp_path / "sp", "sparsify")
    one = load_any(tmp_path / "sp" / "layers.1.mlp")  # one layer of the set, read alone
    assert one.layers == [1]
    cfg_path = tmp_path / "sp" / "layers.0.mlp" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "activation": "groupmax"}))
    with pytest.raises(InvalidArgumentError, match="activation 'groupmax'"):
        load_any(tmp_path / "sp")
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "sp" / "layers.1.mlp").rename(tmp_path / "sp" / "layers.1")  # residual stream
    with pytest.raises(InvalidArgumentError, match="must be an MLP's"):
        load_any(tmp_path / "sp")


def test_circuit_tracer_files_found_without_a_list_and_its_limits_warned(tmp_path, caplog):
    """circuit-tracer's own configs may leave out the file list (it lists the directory);
    what circuit-tracer would load wrong is named when saving."""
    import yaml

    tset = make_set("transcoder", "relu")
    save(tset, tmp_path / "ct")
    config = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    assert "transcoders" not in config  # bare names would resolve against a hub reader's cwd
    (tmp_path / "ct" / "circuitscope.json").unlink()
    back = load_any(tmp_path / "ct")
    x = torch.randn(4, D_MODEL)
    assert back.layers == tset.layers
    assert torch.equal(back.encode(2, x), tset.encode(2, x))
    with caplog.at_level("WARNING"):
        save(make_set("transcoder", "topk"), tmp_path / "topk")
        save(make_set("clt", "relu", skip=True), tmp_path / "clt")
    assert "no TopK loader" in caplog.text and "drops the skip weights" in caplog.text
