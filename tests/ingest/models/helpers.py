"""Builders for tiny, randomly initialised HF causal LMs of every supported family.

Weights are drawn with a large init range and the norm weights/biases are randomised too,
so that attention patterns are far from uniform and any mix-up of norm parameters, head
layouts or biases shows in the logits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 48
N_CTX = 16


def _gpt2() -> PreTrainedModel:
    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=N_CTX, n_embd=32, n_layer=2, n_head=4, n_inner=48,
        initializer_range=0.3, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)


def _neox(parallel: bool) -> PreTrainedModel:
    cfg = GPTNeoXConfig(
        vocab_size=VOCAB, max_position_embeddings=N_CTX, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=48, rotary_pct=0.5,
        use_parallel_residual=parallel, initializer_range=0.3, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return GPTNeoXForCausalLM(cfg)


def _llama(tied: bool) -> PreTrainedModel:
    cfg = LlamaConfig(
        vocab_size=VOCAB, max_position_embeddings=N_CTX, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2 if not tied else 1,
        head_dim=8 if not tied else 12, intermediate_size=48, tie_word_embeddings=tied,
        attention_bias=tied, mlp_bias=tied, initializer_range=0.3, bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


# name -> builder; "llama_tied" also has attention and MLP biases and head_dim != d_model / heads.
BUILDERS: dict[str, Callable[[], PreTrainedModel]] = {
    "gpt2": _gpt2,
    "neox_parallel": lambda: _neox(True),
    "neox_sequential": lambda: _neox(False),
    "llama_gqa": lambda: _llama(False),
    "llama_tied": lambda: _llama(True),
}
ARCHS = list(BUILDERS)
PARALLEL = {"neox_parallel"}

_SMALL = {"max_position_embeddings": N_CTX, "hidden_size": 32, "num_hidden_layers": 2,
          "num_attention_heads": 4, "intermediate_size": 48, "initializer_range": 0.3,
          "vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1}  # fmt: skip

# Less common settings of the same families: attention scaling, biases, rope scaling
# (rotary angles come from HF's own module), sliding windows.
VARIANTS: dict[str, Callable[[], PreTrainedModel]] = {
    "gpt2_scaled_relu": lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_positions=N_CTX, n_embd=32, n_layer=2, n_head=4,
        scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True,
        activation_function="relu", initializer_range=0.3, bos_token_id=0, eos_token_id=1,
    )),
    "neox_no_bias_full_rotary": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
        **_SMALL, attention_bias=False, rotary_pct=1.0, hidden_act="gelu_fast",
    )),
    "llama_rope_linear": lambda: LlamaForCausalLM(LlamaConfig(
        **_SMALL, num_key_value_heads=2,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0},
    )),
    "llama_rope_yarn": lambda: LlamaForCausalLM(LlamaConfig(
        **_SMALL, rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "rope_theta": 100.0,
            "original_max_position_embeddings": 4,
        },
    )),
    "mistral_window": lambda: MistralForCausalLM(MistralConfig(
        **_SMALL, num_key_value_heads=2, sliding_window=4,
    )),
    "qwen2_window": lambda: Qwen2ForCausalLM(Qwen2Config(
        **_SMALL, num_key_value_heads=2, use_sliding_window=True, sliding_window=3,
        max_window_layers=1,
    )),
    # keys HF reads for another model_type only: each must be ignored, as HF ignores it
    "llama_stray_window": lambda: LlamaForCausalLM(LlamaConfig(
        **_SMALL, num_key_value_heads=2, sliding_window=3,
    )),
    "mistral_window_layer_types": lambda: MistralForCausalLM(MistralConfig(
        **_SMALL, num_key_value_heads=2, sliding_window=3,
        layer_types=["full_attention", "full_attention"],
    )),
    # explicit layer_types win over max_window_layers (which would slide layer 1 only)
    "qwen2_layer_types": lambda: Qwen2ForCausalLM(Qwen2Config(
        **_SMALL, num_key_value_heads=2, use_sliding_window=True, sliding_window=3,
        max_window_layers=1, layer_types=["sliding_attention", "full_attention"],
    )),
    # use_sliding_window off: no window, whatever sliding_window and max_window_layers say
    "qwen2_window_off": lambda: Qwen2ForCausalLM(Qwen2Config(
        **_SMALL, num_key_value_heads=2, use_sliding_window=False, sliding_window=3,
        max_window_layers=0,
    )),
}  # fmt: skip


def build(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> PreTrainedModel:
    """A fresh tiny model of ``arch`` in eval mode with eager attention."""
    torch.manual_seed(seed)
    model = (BUILDERS | VARIANTS)[arch]()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.endswith("ln_f.weight"):
                # norm weights around 1, biases around 0, both random
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
    model.config._attn_implementation = "eager"
    return model.to(dtype).eval()


@functools.cache
def cached(arch: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A shared model for read-only tests (do not modify it)."""
    return build(arch, dtype)


def random_ids(batch: int = 2, tokens: int = 9, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, tokens), generator=gen)


def tolerance(dtype: torch.dtype) -> float:
    """Absolute tolerance for comparisons of logits of order 1."""
    return 1e-5 if dtype == torch.float32 else 1e-10


def assert_logits_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """The float32 reconstruction bar of DESIGN 5.4: max abs diff <= 1e-5 times the logit
    scale (HF's own float32 forward is that far from float64; see docs/models.md)."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=0)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over ``VOCAB`` words ``<unk> <eos> w2 ... w47``."""
    vocab = {"<unk>": 0, "<eos>": 1} | {f"w{i}": i for i in range(2, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
