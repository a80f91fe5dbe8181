"""Per-latent statistics of a transcoder set, for the feature catalog.

For every latent of every covered layer, over the eval split of a prompt source, at the
*counted* tokens: the real (unpadded) ones, except a window's leading beginning-of-sequence
token (the model's ``bos_token_id`` at position 0), whose features attribution holds at
zero (:meth:`ingest.models.ModelAdapter.leading_bos`), so the catalog never
shows an activation that no graph contains:

- ``density``: fraction of counted tokens where the latent is active (> 0);
- ``max_activation``: its largest activation (0 when never active), whatever ``top_k``;
- ``top_examples``: the ``top_k`` highest activations with (window, position), the
  token there and a window of decoded context before it, one per distinct context
  (prompts made from templates repeat the same context in many windows: each context
  counts once, at its highest activation, so a latent gets ``top_k`` examples whenever it
  fires in that many distinct contexts); ``top_k`` 0 gives none;
- ``top_tokens``: vocabulary tokens whose embeddings most excite the latent, the
  "de-embedding" (Dunefsky et al. 2024) ``N(W_E) W_enc[i]``, with ``N`` the linear part
  of the MLP norm the encoder reads through (:meth:`ingest.models.components.Norm.linear`:
  its weight, and the centering of a LayerNorm; the per-token denominator is left out);
- ``output_tokens``: tokens the latent's decoder most promotes, its direct logit effect
  ``N_f(W_dec[i]) W_U`` through the final norm's linear part (for a CLT, the sum of its
  decoders into every layer it writes to).

Examples are kept in a running pool of ``top_k`` distinct contexts per latent. Each
batch's positions get a key of the context shown with them (:func:`context_keys`); per
latent the batch's best position of each key competes with the pool, and where the pool
and the batch share a key only the higher activation stays, so the pool stays distinct
and holds exactly the ``top_k`` best contexts seen so far.

:func:`compute_feature_stats` returns a list of dicts with keys ``set_id, layer, index,
density, max_activation, top_examples, top_tokens, output_tokens``; the CLI writes it as
``feature_stats.json`` next to the set.
"""

import logging
from typing import Any

import torch
from tqdm import tqdm

from ingest.errors import InvalidArgumentError
from ingest.transcoders.buffer import check_finite, check_window_fits
from ingest.transcoders.sources import Source
from ingest.transcoders.transcoder_set import TranscoderSet

logger = logging.getLogger(__name__)


def _decode(tokenizer: Any, ids: list[int]) -> str:
    if tokenizer is None:
        return " ".join(str(i) for i in ids)
    return str(tokenizer.decode(ids))


def _token_list(
    tokenizer: Any, rows: torch.Tensor, vocab: torch.Tensor, top: int, chunk: int = 1024
) -> list[list[dict[str, Any]]]:
    """rows: (n_latents, d), vocab: (d, V) -> per latent the ``top`` tokens of rows @ vocab.

    Computed in chunks of latents so a large vocabulary never needs (n_latents, V) at once.
    """
    parts = [
        (rows[lo : lo + chunk] @ vocab).topk(min(top, vocab.shape[-1]), dim=-1)
        for lo in range(0, rows.shape[0], chunk)
    ]
    values = torch.cat([p.values for p in parts]).cpu()
    indices = torch.cat([p.indices for p in parts]).cpu()
    return [
        [
            {"id": int(i), "token": _decode(tokenizer, [int(i)]), "score": float(v)}
            for v, i in zip(vals.tolist(), idx.tolist(), strict=True)
        ]
        for vals, idx in zip(values, indices, strict=True)
    ]


#: Moduli and bases of the two polynomial hashes a context key is made of: primes below
#: 2^31, so no product overflows int64, and two of them make a collision of distinct
#: contexts (which would drop one of them) about as likely as 2^-62.
_HASH_PRIMES = (2_147_483_647, 2_147_483_629)
_HASH_BASES = (1_000_003, 999_983)


def context_keys(ids: torch.Tensor, context: int) -> torch.Tensor:
    """ids: (B, T) -> (B, T) int64 keys >= 0 of the context shown with each position,
    ``ids[b, max(0, t - context) : t + 1]``: equal for equal contexts."""
    digits = ids.long() + 1  # 0 before the window's start: a shorter context's key
    width = digits.shape[1]
    keys = []
    for prime, base in zip(_HASH_PRIMES, _HASH_BASES, strict=True):
        key = torch.zeros_like(digits)
        for back in range(min(context, width - 1), -1, -1):  # the oldest token first
            earlier = torch.zeros_like(digits)
            earlier[:, back:] = digits[:, : width - back]
            key = (key * base + earlier) % prime
        keys.append(key)
    return keys[0] * 2**31 + keys[1]


#: Latent-by-position entries :func:`_best_per_context` works on at once: its temporaries
#: cost about 13 bytes an entry (a gathered float, a comparison, a position), so a chunk
#: of latents bounds them to about 200 MB whatever the width and batch.
_CHUNK_ENTRIES = 1 << 24


def _best_per_context(
    acts: torch.Tensor, keys: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """acts: (d_t, N) activations at N positions with context keys (N,) -> per latent the
    ``k`` (or fewer) highest of its best activation per distinct key: values, keys and the
    position (index into N) of each, all (d_t, min(k, distinct keys)). Latents are taken
    in chunks of :data:`_CHUNK_ENTRIES` entries."""
    d_t, n = acts.shape
    unique, inverse = torch.unique(keys, return_inverse=True)  # (U,), (N,)
    rows = max(1, _CHUNK_ENTRIES // max(n, 1))
    parts = [_best_of_chunk(acts[lo : lo + rows], unique, inverse, k) for lo in range(0, d_t, rows)]
    vals, picked, where = (torch.cat(p) for p in zip(*parts, strict=True))
    return vals, picked, where


def _best_of_chunk(
    acts: torch.Tensor, unique: torch.Tensor, inverse: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_best_per_context` for a chunk of latents (c, N), keys already grouped."""
    c, n = acts.shape
    group = inverse.expand(c, n)
    best = acts.new_full((c, len(unique)), -torch.inf).scatter_reduce(1, group, acts, "amax")
    position = torch.arange(n, device=acts.device).expand(c, n)
    at_best = torch.where(acts == best.gather(1, group), position, n)
    where = torch.full_like(best, n, dtype=torch.long).scatter_reduce(1, group, at_best, "amin")
    vals, pick = best.topk(min(k, len(unique)), dim=-1)
    return vals, unique[pick], where.gather(1, pick)


def _merge(
    pool: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    new: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, keys, locations), each (d_t, k) for the pool and (d_t, k') for a batch's
    candidates, each distinct in keys per latent -> the pool's next ``k``: the highest
    values, a key shared by both kept once, at its higher value."""
    pool_val, pool_key, pool_loc = pool
    new_val, new_key, new_loc = new
    same = pool_key[:, :, None] == new_key[:, None, :]  # (d_t, k, k')
    pool_higher = pool_val[:, :, None] >= new_val[:, None, :]
    new_val = new_val.masked_fill((same & pool_higher).any(1), -torch.inf)
    pool_val = pool_val.masked_fill((same & ~pool_higher).any(2), -torch.inf)
    values, keep = torch.cat([pool_val, new_val], -1).topk(pool_val.shape[1], dim=-1)
    keys = torch.cat([pool_key, new_key], -1).gather(-1, keep)
    return values, keys, torch.cat([pool_loc, new_loc], -1).gather(-1, keep)


def check_stats_options(n_windows: int, top_k: int) -> None:
    """A clear error, naming the flag, for a window count or example count out of range."""
    if n_windows < 1:
        raise InvalidArgumentError(f"n_windows (--windows) must be at least 1, got {n_windows}")
    if top_k < 0:
        raise InvalidArgumentError(f"top_k (--top-k) must be 0 (no examples) or more, got {top_k}")


@torch.no_grad()
def compute_feature_stats(
    adapter: Any,
    tset: TranscoderSet,
    source: Source,
    tokenizer: Any = None,
    *,
    n_windows: int = 128,
    batch_size: int = 16,
    top_k: int = 10,
    top_tokens: int = 10,
    context: int = 8,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The module docstring's statistics of every latent of ``tset`` over the first
    ``n_windows`` eval windows of ``source`` (model forwards of ``batch_size`` windows),
    with ``top_k`` examples of ``context`` tokens before them and ``top_tokens`` tokens
    each way; ``tokenizer`` decodes tokens (ids are shown without one)."""
    check_stats_options(n_windows, top_k)
    tset.check_fits(adapter)
    check_window_fits(adapter, source)
    layers = tset.layers
    d_t = tset.d_transcoder
    n = min(n_windows, source.n_windows("eval"))
    windows = source.get("eval", 0, n)
    device = adapter.device
    count = {layer: torch.zeros(d_t, dtype=torch.long, device=device) for layer in layers}
    peak = {layer: torch.zeros(d_t, device=device) for layer in layers}
    pool = {
        layer: (
            torch.full((d_t, top_k), -torch.inf, device=device),
            torch.full((d_t, top_k), -1, dtype=torch.long, device=device),  # no key
            torch.zeros(d_t, top_k, dtype=torch.long, device=device),
        )
        for layer in layers
    }
    width = windows.ids.shape[1]
    position = torch.arange(width)
    tokens = 0
    for lo in tqdm(range(0, n, batch_size), disable=not progress, desc="feature stats"):
        ids = windows.ids[lo : lo + batch_size]
        held = adapter.leading_bos(ids)  # (B,)
        counted = windows.mask[lo : lo + batch_size] & (position >= held[:, None])  # (B, T)
        flat_loc = (torch.arange(ids.shape[0])[:, None] + lo) * width + position
        loc = flat_loc[counted].to(device)  # (N,) global window * width + position
        keys = context_keys(ids, context)[counted].to(device)  # (N,)
        counted = counted.to(device)
        tokens += int(counted.sum())
        mlp_in, mlp_out = adapter.mlp_sites(ids.to(device), layers)
        sites, name = (mlp_out, "MLP output") if tset.kind == "sae" else (mlp_in, "MLP input")
        for layer, x in zip(layers, sites, strict=True):
            check_finite(x, layer, name, "eval split")
            flat = tset.encode(layer, x[counted]).float().T  # (d_t, N)
            if not flat.shape[1]:
                continue
            count[layer] += (flat > 0).sum(-1)
            peak[layer] = torch.maximum(peak[layer], flat.amax(-1))
            if top_k:
                vals, batch_keys, at = _best_per_context(flat, keys, top_k)
                pool[layer] = _merge(pool[layer], (vals, batch_keys, loc[at]))
    if tokens == 0:
        raise InvalidArgumentError(
            f"the first {n} eval windows of {source.name!r} hold no token to count (a "
            "leading BOS is not counted): give longer prompts or more windows"
        )
    all_ids = windows.ids
    out: list[dict[str, Any]] = []
    W_E, W_U = adapter.W_E.float(), adapter.W_U.float()
    for layer in layers:
        reads = adapter.block(layer).mlp_norm.linear(W_E)  # (V, d)
        writes = sum(tset.W_dec(layer, t).float() for t in tset.targets(layer))  # (d_t, d)
        written = adapter.final_norm.linear(writes)
        de_embed = _token_list(tokenizer, tset.W_enc(layer).float(), reads.T, top_tokens)
        promoted = _token_list(tokenizer, written, W_U, top_tokens)
        vals, _, locs = (t.cpu() for t in pool[layer])
        density = (count[layer].double() / tokens).cpu()
        maxima = peak[layer].cpu()
        for i in range(d_t):
            examples: list[dict[str, Any]] = []
            for v, loc in zip(vals[i].tolist(), locs[i].tolist(), strict=True):
                if not v > 0:
                    break  # sorted: the rest are no larger
                window, pos = divmod(int(loc), width)
                row = all_ids[window].tolist()
                examples.append(
                    {
                        "window": window,
                        "position": pos,
                        "activation": float(v),
                        "token": _decode(tokenizer, [row[pos]]),
                        "context": _decode(tokenizer, row[max(0, pos - context) : pos + 1]),
                    }
                )
            out.append(
                {
                    "set_id": tset.metadata.set_id,
                    "layer": layer,
                    "index": i,
                    "density": float(density[i]),
                    "max_activation": float(maxima[i]),
                    "top_examples": examples,
                    "top_tokens": de_embed[i],
                    "output_tokens": promoted[i],
                }
            )
    return out
