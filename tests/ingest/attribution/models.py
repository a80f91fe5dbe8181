"""Tiny real HF models of the three families and random transcoder sets for them."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from ingest.models import ModelAdapter, adapter_from_hf
from ingest.transcoders.clt import CrossLayerTranscoder
from ingest.transcoders.config import TranscoderConfig
from ingest.transcoders.transcoder import Transcoder
from ingest.transcoders.transcoder_set import SetMetadata, TranscoderSet

VOCAB = 40
D = 16
N_LAYERS = 2
N_CTX = 24
FAMILIES = ["gpt2", "neox", "llama"]


def hf_model(family: str, seed: int = 0, n_layers: int = N_LAYERS) -> PreTrainedModel:
    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1}
    if family == "gpt2":
        model: PreTrainedModel = GPT2LMHeadModel(GPT2Config(
            n_positions=N_CTX, n_embd=D, n_layer=n_layers, n_head=2, n_inner=32,
            initializer_range=0.3, **common))  # fmt: skip
    elif family == "neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(
            max_position_embeddings=N_CTX, hidden_size=D, num_hidden_layers=n_layers,
            num_attention_heads=2, intermediate_size=32, rotary_pct=0.5,
            use_parallel_residual=True, initializer_range=0.3, **common))  # fmt: skip
    else:
        model = LlamaForCausalLM(LlamaConfig(
            max_position_embeddings=N_CTX, hidden_size=D, num_hidden_layers=n_layers,
            num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
            initializer_range=0.3, pad_token_id=None, **common))  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.config._attn_implementation = "eager"
    return model.eval()


def adapter(family: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> ModelAdapter:
    return adapter_from_hf(hf_model(family, seed).to(dtype))


def transcoder_set(
    adp: ModelAdapter,
    kind: str = "transcoder",
    skip: bool = False,
    layers: list[int] | None = None,
    d_transcoder: int = 24,
    seed: int = 0,
    arch: str = "relu",
) -> TranscoderSet:
    """A random set whose ReLU features are active on roughly half of the tokens (TopK: 6
    per token; JumpReLU and BatchTopK: those above random positive thresholds)."""
    sparsity = 6 if arch in ("topk", "batchtopk") else 0.1
    cfg = TranscoderConfig(arch=arch, d_in=adp.d_model, d_out=adp.d_model,
                           d_transcoder=d_transcoder, sparsity=sparsity, skip=skip)  # fmt: skip
    layers = list(range(adp.n_layers)) if layers is None else layers
    meta = SetMetadata(
        kind=kind, model_id="tiny", model_fingerprint=adp.fingerprint(),
        n_layers=adp.n_layers, d_model=adp.d_model, layers=layers, config=cfg,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)

    def fill(module: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, p in module.named_parameters():
                scale = {"W_enc": 0.4, "b_enc": 0.2, "W_skip": 0.1}.get(name.split(".")[-1], 0.2)
                values = torch.randn(p.shape, generator=gen) * scale
                p.copy_(values.abs() if name.endswith("threshold") else values)

    if kind == "clt":
        clt = CrossLayerTranscoder(cfg, len(layers))
        fill(clt)
        tcs = TranscoderSet(meta, clt)
    else:
        mods = {}
        for layer in layers:
            mods[layer] = Transcoder(cfg)
            fill(mods[layer])
        tcs = TranscoderSet(meta, mods)
    return tcs.to(adp.dtype)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``<unk> <eos> w2 ... w39``."""
    vocab = {"<unk>": 0, "<eos>": 1} | {f"w{i}": i for i in range(2, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
