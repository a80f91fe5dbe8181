"""Model families of the zoo, registered by name in :data:`ARCHITECTURES`.

Each entry turns a :class:`~ingest.zoo.task.ModelShape` and a vocabulary into an ordinary
Hugging Face config, so a trained zoo model is a stock ``GPT2LMHeadModel``,
``GPTNeoXForCausalLM`` or ``LlamaForCausalLM`` (float32, eager attention, no dropout).
Family conventions are kept: GPT-2 ties its embeddings and uses learned positions;
GPT-NeoX (Pythia) uses parallel attention/MLP and rotary embeddings on a quarter of each
head; Llama uses RMSNorm, SwiGLU and full rotary embeddings, with untied embeddings.
"""

from collections.abc import Callable
from dataclasses import dataclass

from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, PretrainedConfig

from ingest.zoo.registry import Registry
from ingest.zoo.task import ModelShape


@dataclass(frozen=True)
class SpecialIds:
    """Token ids a config records (pad, bos, eos)."""

    pad: int
    bos: int
    eos: int


@dataclass(frozen=True)
class Architecture:
    """A model family: its name, Hugging Face ``model_type`` and config builder."""

    name: str
    model_type: str
    build: Callable[[ModelShape, int, SpecialIds], PretrainedConfig]

    def config(self, shape: ModelShape, vocab_size: int, ids: SpecialIds) -> PretrainedConfig:
        return self.build(shape, vocab_size, ids)


def _gpt2(shape: ModelShape, vocab_size: int, ids: SpecialIds) -> PretrainedConfig:
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=shape.n_ctx,
        n_embd=shape.d_model,
        n_layer=shape.n_layers,
        n_head=shape.n_heads,
        n_inner=shape.d_mlp,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=ids.pad,
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
    )


def _neox(shape: ModelShape, vocab_size: int, ids: SpecialIds) -> PretrainedConfig:
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        max_position_embeddings=shape.n_ctx,
        hidden_size=shape.d_model,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads,
        intermediate_size=shape.d_mlp,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
        },
        use_parallel_residual=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        pad_token_id=ids.pad,
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
    )


def _llama(shape: ModelShape, vocab_size: int, ids: SpecialIds) -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=shape.n_ctx,
        hidden_size=shape.d_model,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_heads,
        intermediate_size=shape.d_mlp,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        pad_token_id=ids.pad,
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
    )


ARCHITECTURES: Registry[Architecture] = Registry("architecture")
for _arch in (
    Architecture("gpt2", "gpt2", _gpt2),
    Architecture("neox", "gpt_neox", _neox),
    Architecture("llama", "llama", _llama),
):
    ARCHITECTURES.register(_arch.name, _arch)


def get_architecture(name: str) -> Architecture:
    """The registered architecture called ``name``."""
    return ARCHITECTURES.get(name)
