"""Per-latent statistics of a transcoder set, for the feature catalog.

For every latent of every covered layer, over the eval split of a prompt source:

- ``density``: fraction of real tokens where the latent is active (> 0);
- ``max_activation``;
- ``top_examples``: the ``top_k`` highest activations with (window, position), the
  token there and a window of decoded context before it, one per distinct context
  (prompts made from templates repeat the same context in many windows; the highest
  ``CANDIDATES_PER_EXAMPLE x top_k`` activations are kept to fill ``top_k`` distinct ones);
- ``top_tokens``: vocabulary tokens whose embeddings most excite the latent,
  the "de-embedding" ``W_E W_enc[i]`` (Dunefsky et al. 2024);
- ``output_tokens``: tokens the latent's decoder most promotes, ``W_dec[i] W_U``
  (decoder into its own layer for a CLT).

:func:`compute_feature_stats` returns a list of dicts with keys ``set_id, layer, index,
density, max_activation, top_examples, top_tokens, output_tokens``; the CLI writes it as
``feature_stats.json`` next to the set.
"""

import logging
from typing import Any

import torch
from tqdm import tqdm

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


#: Candidates kept per requested top example, from which repeated contexts are dropped.
CANDIDATES_PER_EXAMPLE = 4


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
    tset.check_fits(adapter)
    layers = tset.layers
    d_t = tset.d_transcoder
    n = min(n_windows, source.n_windows("eval"))
    windows = source.get("eval", 0, n)
    device = adapter.device
    count = {layer: torch.zeros(d_t, device=device) for layer in layers}
    pool = CANDIDATES_PER_EXAMPLE * top_k
    best_val = {layer: torch.full((d_t, pool), -torch.inf, device=device) for layer in layers}
    best_loc = {layer: torch.zeros(d_t, pool, dtype=torch.long, device=device) for layer in layers}
    width = windows.ids.shape[1]
    tokens = 0
    for lo in tqdm(range(0, n, batch_size), disable=not progress, desc="feature stats"):
        ids = windows.ids[lo : lo + batch_size].to(device)
        mask = windows.mask[lo : lo + batch_size].to(device)
        mlp_in, mlp_out = adapter.mlp_sites(ids, layers)
        site = dict(zip(layers, mlp_out if tset.kind == "sae" else mlp_in, strict=True))
        tokens += int(mask.sum())
        flat_loc = (torch.arange(ids.shape[0], device=device)[:, None] + lo) * width + torch.arange(
            width, device=device
        )  # (B, T) global (window * width + position)
        for layer in layers:
            x = site[layer]
            acts = tset.encode(layer, x) * mask[..., None]  # (B, T, d_t)
            flat = acts.reshape(-1, d_t).T  # (d_t, B*T)
            count[layer] += (flat > 0).sum(-1)
            k = min(pool, flat.shape[1])
            vals, idx = flat.topk(k, dim=-1)
            merged_val = torch.cat([best_val[layer], vals], -1)
            merged_loc = torch.cat([best_loc[layer], flat_loc.reshape(-1)[idx]], -1)
            keep_val, keep_idx = merged_val.topk(pool, dim=-1)
            best_val[layer] = keep_val
            best_loc[layer] = merged_loc.gather(-1, keep_idx)
    all_ids = windows.ids
    out: list[dict[str, Any]] = []
    for layer in layers:
        W_enc = tset.W_enc(layer).float()  # (d_t, d)
        W_dec = tset.W_dec(layer, layer).float()  # (d_t, d)
        de_embed = _token_list(tokenizer, W_enc, adapter.W_E.float().T, top_tokens)
        promoted = _token_list(tokenizer, W_dec, adapter.W_U.float(), top_tokens)
        vals, locs = best_val[layer].cpu(), best_loc[layer].cpu()
        density = (count[layer] / max(tokens, 1)).cpu()
        for i in range(d_t):
            examples: list[dict[str, Any]] = []
            seen: set[tuple[int, ...]] = set()
            for v, loc in zip(vals[i].tolist(), locs[i].tolist(), strict=True):
                if not v > 0 or len(examples) == top_k:
                    break  # sorted: the rest are no larger
                window, pos = divmod(int(loc), width)
                row = all_ids[window].tolist()
                shown = tuple(row[max(0, pos - context) : pos + 1])
                if shown in seen:
                    continue
                seen.add(shown)
                examples.append(
                    {
                        "window": window,
                        "position": pos,
                        "activation": float(v),
                        "token": _decode(tokenizer, [row[pos]]),
                        "context": _decode(tokenizer, list(shown)),
                    }
                )
            out.append(
                {
                    "set_id": tset.metadata.set_id,
                    "layer": layer,
                    "index": i,
                    "density": float(density[i]),
                    "max_activation": float(examples[0]["activation"]) if examples else 0.0,
                    "top_examples": examples,
                    "top_tokens": de_embed[i],
                    "output_tokens": promoted[i],
                }
            )
    return out
