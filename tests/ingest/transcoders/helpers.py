"""Small builders for transcoder tests: random sets of every kind and architecture."""

import torch

from ingest.transcoders.clt import CrossLayerTranscoder
from ingest.transcoders.config import TranscoderConfig
from ingest.transcoders.transcoder import Transcoder
from ingest.transcoders.transcoder_set import SetMetadata, TranscoderSet

D_MODEL = 8
D_T = 16
N_LAYERS = 3


def config(arch: str = "relu", skip: bool = False, d_t: int = D_T, d: int = D_MODEL):
    sparsity = {"relu": 0.1, "topk": 4, "jumprelu": 0.01, "batchtopk": 4}[arch]
    return TranscoderConfig(
        arch=arch, d_in=d, d_out=d, d_transcoder=d_t, sparsity=sparsity, skip=skip
    )


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Fill every parameter with distinct random values (thresholds kept positive)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        values = torch.randn(param.shape, generator=gen)
        param.copy_(values.abs() * 0.1 + 0.01 if "threshold" in name else values)


def make_set(
    kind: str = "transcoder",
    arch: str = "relu",
    skip: bool = False,
    layers: list[int] | None = None,
    n_layers: int = N_LAYERS,
    seed: int = 0,
    fingerprint: str = "abc123",
) -> TranscoderSet:
    cfg = config(arch, skip)
    layers = list(range(n_layers)) if layers is None else layers
    meta = SetMetadata(
        kind=kind,
        model_id="tiny-model",
        model_fingerprint=fingerprint,
        n_layers=n_layers,
        d_model=D_MODEL,
        layers=layers,
        config=cfg,
    )
    if kind == "clt":
        clt = CrossLayerTranscoder(cfg, len(layers))
        randomize(clt, seed)
        return TranscoderSet(meta, clt)
    modules = {}
    for i, layer in enumerate(layers):
        module = Transcoder(cfg)
        randomize(module, seed + i)
        modules[layer] = module
    return TranscoderSet(meta, modules)


def assert_sets_equal(a: TranscoderSet, b: TranscoderSet) -> None:
    assert a.metadata.to_dict() == b.metadata.to_dict()
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def tiny_gpt2(seed: int = 0, vocab: int = 40, n_layers: int = 2, act: str = "gelu_new"):
    """A real, randomly initialised GPT-2 (d_model = D_MODEL, d_mlp = 4 * D_MODEL)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab, n_positions=32, n_embd=D_MODEL, n_layer=n_layers, n_head=2,
        n_inner=4 * D_MODEL, initializer_range=0.2, activation_function=act,
        bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    model = GPT2LMHeadModel(cfg).eval()
    model.config._attn_implementation = "eager"
    return model


def tiny_adapter(seed: int = 0, vocab: int = 40, n_layers: int = 2):
    """The model adapter over :func:`tiny_gpt2`."""
    from ingest.models import adapter_from_hf

    return adapter_from_hf(tiny_gpt2(seed, vocab, n_layers))


def random_stream_source(
    n_tokens: int = 4096, vocab: int = 40, context_len: int = 16, seed: int = 0
):
    from ingest.transcoders.sources import StreamSource

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n_tokens,), generator=gen).tolist()
    return StreamSource("random", tokens, context_len, eval_fraction=0.1)


def random_prompt_source(n_train: int = 96, n_eval: int = 16, vocab: int = 40, seed: int = 0):
    """Answer-only prompts of 3-8 random tokens (the last one is the answer), right-padded."""
    from ingest.transcoders.sources import PromptSource

    gen = torch.Generator().manual_seed(seed)

    def prompts(n: int) -> list[list[int]]:
        lengths = torch.randint(3, 9, (n,), generator=gen).tolist()
        return [torch.randint(1, vocab, (t,), generator=gen).tolist() for t in lengths]

    return PromptSource("random prompts", prompts(n_train), prompts(n_eval), answer_only=True)


def word_tokenizer():
    """A WordLevel tokenizer over words ``<pad> <eos> w2 ... w39``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1} | {f"w{i}": i for i in range(2, 40)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
