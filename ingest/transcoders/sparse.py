"""The training step of selecting architectures (TopK, BatchTopK) without dense
activation matrices where it can.

A TopK transcoder activates k of d_transcoder latents per token, a BatchTopK one N k of
the batch's N d_transcoder, and AuxK k_aux of the dead ones per token.
:func:`sparse_forward` computes, in one autograd function,

    pre = x W_enc^T + b_enc                      (N, d_t): the one dense forward matmul
    P   = the entries the activation selects in pre (TopK: each row's k largest;
          BatchTopK: the batch's N k largest), grouped by row;  v = relu(pre[P])
    y   = per row, sum over its entries (column j, value v) of v W_dec[j]: an
          embedding_bag with the rows' offsets
    AuxK, on the first ``aux_rows`` rows and the dead columns D only, densely:
    a = relu(pre[:, D]) kept at each row's k_aux largest;  e = a W_dec[D]

and its backward with one zero-filled (d_t, N) matrix and the dense step's own matmuls:
``dv = (g W_dec^T)[P]``, ``d pre`` put at P, ``d W_enc = d pre^T x``,
``d W_dec = A^T g`` with A the activations put densely; AuxK's terms use the dead
columns only. Autograd through ``gather``/``scatter``/``index_select`` builds and
zero-fills a dense matrix per op (about sixteen per layer and step with AuxK), which on
CPU cost more than the matmuls. The arithmetic is the dense formulation's
(``Transcoder.dense_loss``), so results agree to float rounding
(``tests/ingest/transcoders/test_sparse.py``). The input ``x`` gets no gradient: it is a
recorded activation.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ingest.transcoders.architectures import Selection, topk_indices

#: An activation's ``select``: pre (N, d_t) -> its active entries.
Selector = Callable[[torch.Tensor], Selection]


class _SparseForward(torch.autograd.Function):
    # ``pre`` (x W_enc^T + b_enc, computed outside) comes in without a gradient; W_enc and
    # b_enc come in unused by the forward only so that autograd takes their gradients
    # from this backward, which forms them straight from the sparse pre-activation
    # gradient instead of through a dense (N, d_t) gradient of ``pre``.
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        pre: torch.Tensor,
        rows: torch.Tensor,
        columns: torch.Tensor,
        offsets: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        aux_columns: torch.Tensor | None,
        k_aux: int,
        aux_rows: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, width = pre.shape
        positions = Selection(rows, columns, offsets).positions(width)
        values = pre.view(-1).index_select(0, positions).relu_()
        y = F.embedding_bag(columns, W_dec, offsets, per_sample_weights=values, mode="sum")
        if aux_columns is None:
            aux_columns = positions.new_empty(0)
            aux_acts = values.new_empty(0)
            estimate = y.new_zeros(0)
        else:
            # Dense over the dead columns: (rows, n_dead) is small (losses.aux_k_row_count
            # bounds rows x n_dead). It timed the same as an embedding_bag of the k_aux
            # picks and reads shorter.
            aux_acts = pre[:aux_rows].index_select(1, aux_columns)
            if k_aux < aux_columns.numel():
                local = topk_indices(aux_acts, k_aux)
                chosen = aux_acts.gather(1, local)
                aux_acts = torch.zeros_like(aux_acts).scatter_(1, local, chosen)
            aux_acts.relu_()
            estimate = aux_acts @ W_dec.index_select(0, aux_columns)
        # positions in the transposed (d_t, N) matrices of the backward
        transposed = torch.add(rows, columns, alpha=n)
        ctx.save_for_backward(x, W_dec, positions, transposed, values, aux_columns, aux_acts)
        ctx.mark_non_differentiable(values)
        return y, estimate, values

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_y: torch.Tensor, grad_estimate: torch.Tensor, *_: Any
    ) -> tuple[Any, ...]:
        x, W_dec, positions, transposed, values, aux_columns, aux_acts = ctx.saved_tensors
        # Dense matrices are built transposed, (d_t, N): the weight gradients are then
        # (d_t, N) @ (N, d) products, which run about 25% faster on CPU than the
        # transposed-operand form of the same product.
        grad_values = (grad_y @ W_dec.T).view(-1).index_select(0, positions).mul_(values > 0)
        acts_t = values.new_zeros(W_dec.shape[0], x.shape[0])
        acts_t.view(-1).put_(transposed, values)
        grad_W_dec = acts_t @ grad_y
        # The activations' nonzeros sit exactly at the selected positions (distinct), so
        # putting the gradients there overwrites every one of them: no second zeroing.
        grad_pre_t = acts_t
        grad_pre_t.view(-1).put_(transposed, grad_values)
        if aux_columns.numel():
            # AuxK's terms over its rows and the dead columns only
            rows = aux_acts.shape[0]
            dead_dec = W_dec.index_select(0, aux_columns)
            grad_aux = (grad_estimate @ dead_dec.T).mul_(aux_acts > 0)
            grad_W_dec.index_add_(0, aux_columns, aux_acts.T @ grad_estimate)
            grad_pre_t[:, :rows].index_add_(0, aux_columns, grad_aux.T)
        grad_W_enc = grad_pre_t @ x
        grad_b_enc = grad_pre_t.sum(1)
        return None, None, None, None, None, grad_W_enc, grad_b_enc, grad_W_dec, None, None, None


def sparse_forward(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    select: Selector,
    aux_columns: torch.Tensor | None = None,
    k_aux: int = 0,
    aux_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, Selection, torch.Tensor]:
    """x: (N, d_in) -> (y (N, d_out) without b_dec, AuxK estimate (min(N, aux_rows) or N,
    d_out) or empty, the active entries, their values (M,)).

    ``select``: the activation's choice of entries; ``aux_columns``: the dead latents'
    ids (None: no AuxK); ``aux_rows``: rows AuxK uses (0: all).
    """
    if x.requires_grad:
        raise ValueError("sparse_forward does not back-propagate to x: pass a detached input")
    with torch.no_grad():
        pre = torch.addmm(b_enc, x, W_enc.T)
        chosen = select(pre)
    rows = aux_rows or x.shape[0]
    y, estimate, values = _SparseForward.apply(
        x, pre, *chosen, W_enc, b_enc, W_dec, aux_columns, k_aux, rows
    )
    return y, estimate, chosen, values
