"""The sparse training step (TopK, BatchTopK) computes the dense formulation's loss and grads."""

import pytest
import torch

from ingest.transcoders.losses import aux_k_row_count
from ingest.transcoders.sparse import sparse_forward
from ingest.transcoders.transcoder import Transcoder
from tests.ingest.transcoders.helpers import D_MODEL, D_T, config, randomize

pytestmark = pytest.mark.unit

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def grads(module: Transcoder, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    module.zero_grad()
    loss.backward()
    names = PARAMS + (("W_skip",) if module.W_skip is not None else ())
    return {name: getattr(module, name).grad.clone() for name in names}


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("rows", [0, 2])
@pytest.mark.parametrize("n_dead", [0, 3, 5, D_T])
@pytest.mark.parametrize("weighted", [False, True])
def test_sparse_loss_and_gradients_match_the_dense_formulation(arch, skip, rows, n_dead, weighted):
    cfg = config(arch, skip=skip)
    cfg = type(cfg)(**{**cfg.to_dict(), "aux_k_rows": rows, "aux_k_coefficient": 0.5})
    module = Transcoder(cfg)
    randomize(module)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, D_MODEL, generator=gen)
    y = torch.randn(24, D_MODEL, generator=gen)
    # AuxK's k is 4: 3 dead latents are all picked, 5 and 16 through a top-k selection;
    # with a budget of 2 rows per latent, AuxK uses 10, 6 and 2 rows of 24.
    # n_dead = D_T: every latent counts as dead, so AuxK's picks overlap the top k
    dead = None
    if n_dead:
        dead = torch.zeros(D_T, dtype=torch.bool)
        dead[torch.randperm(D_T, generator=gen)[:n_dead]] = True

    weight = torch.rand(24, generator=gen) * 4 + 0.5 if weighted else None

    parts = module.loss(x, y, dead, weight)
    ref = module.dense_loss(x, y, dead, weight)
    torch.testing.assert_close(parts.mse, ref.mse)
    torch.testing.assert_close(parts.aux, ref.aux)
    assert torch.equal(parts.fired, ref.fired)
    torch.testing.assert_close(parts.l0, ref.l0)
    assert (n_dead > 0) == bool(ref.aux > 0)

    sparse = grads(module, parts.mse + parts.aux)
    dense = grads(module, ref.mse + ref.aux)
    for name, grad in dense.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(sparse[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    if weighted:  # the weights change the loss
        assert not torch.allclose(parts.mse, module.loss(x, y, dead).mse)


def test_aux_k_rows_follow_a_budget_of_rows_times_latents():
    # 256 rows when every latent of 512 is dead, more as fewer are, up to the batch
    assert aux_k_row_count(256, 512, 512, 4096) == 256
    assert aux_k_row_count(256, 410, 512, 4096) == 319
    assert aux_k_row_count(256, 51, 512, 4096) == 2570
    assert aux_k_row_count(256, 25, 512, 4096) == 4096
    assert aux_k_row_count(256, 51, 512, 1000) == 1000
    # 0 means every row; fewer rows than asked only when the batch is smaller
    assert aux_k_row_count(0, 51, 512, 4096) == 4096
    assert aux_k_row_count(256, 512, 512, 100) == 100


def test_aux_k_rows_limit_which_tokens_train_the_dead_latents():
    module = Transcoder(config("topk"))
    randomize(module)
    x = torch.randn(32, D_MODEL)
    dead = torch.zeros(D_T, dtype=torch.bool)
    dead[:5] = True
    columns = dead.nonzero().squeeze(1)
    params = (module.W_enc, module.b_enc, module.W_dec, module.activation.select)
    for rows in (4, 32):
        _, estimate, _, _ = sparse_forward(x, *params, columns, 3, rows)
        assert estimate.shape == (rows, D_MODEL)
    # an input change outside the first rows leaves AuxK's estimate unchanged
    x2 = x.clone()
    x2[10:] += 1.0
    a = sparse_forward(x, *params, columns, 3, 8)[1]
    b = sparse_forward(x2, *params, columns, 3, 8)[1]
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_forward_without_aux_returns_the_training_activations(arch):
    module = Transcoder(config(arch))
    randomize(module)
    x = torch.randn(16, D_MODEL)
    select = module.activation.select
    decoded, estimate, chosen, values = sparse_forward(
        x, module.W_enc, module.b_enc, module.W_dec, select
    )
    acts = module.activation.train_forward(module.pre_activations(x))
    dense = torch.zeros_like(acts).index_put((chosen.rows, chosen.columns), values)
    torch.testing.assert_close(dense, acts)
    torch.testing.assert_close(decoded + module.b_dec, module.decode(acts, x))
    assert estimate.numel() == 0
    per_row = (dense > 0).sum(1)
    if arch == "topk":  # k per token
        assert bool((per_row <= module.cfg.k).all())
    else:  # N k over the batch, unevenly
        assert values.numel() == 16 * module.cfg.k and per_row.unique().numel() > 1
    assert bool((chosen.rows.diff() >= 0).all())  # grouped by row in row order
    counts = torch.bincount(chosen.rows, minlength=16)
    assert torch.equal(chosen.offsets, counts.cumsum(0) - counts)


def test_sparse_forward_refuses_an_input_that_needs_a_gradient():
    module = Transcoder(config("topk"))
    x = torch.randn(4, D_MODEL, requires_grad=True)
    with pytest.raises(ValueError, match="detached input"):
        sparse_forward(x, module.W_enc, module.b_enc, module.W_dec, module.activation.select)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu"])
@pytest.mark.parametrize("n_dead", [0, 3, 5, D_T])
@pytest.mark.parametrize("weighted", [False, True])
def test_static_aux_k_equals_the_dynamic_one_over_the_same_rows(arch, n_dead, weighted):
    """The compiled step's AuxK (fixed shapes: every column, the live ones masked) is the
    dynamic AuxK's loss and gradients when both use every row (aux_k_rows 0); with no
    dead latent it is zero."""
    cfg = config(arch, skip=True)
    cfg = type(cfg)(**{**cfg.to_dict(), "aux_k_rows": 0, "aux_k_coefficient": 0.5})
    module = Transcoder(cfg)
    randomize(module)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(24, D_MODEL, generator=gen)
    y = torch.randn(24, D_MODEL, generator=gen)
    dead = torch.zeros(D_T, dtype=torch.bool)
    dead[torch.randperm(D_T, generator=gen)[:n_dead]] = True
    weight = torch.rand(24, generator=gen) * 4 + 0.5 if weighted else None

    static = module.loss(x, y, dead, weight, static=True)
    dynamic = module.loss(x, y, dead, weight)
    torch.testing.assert_close(static.mse, dynamic.mse)
    torch.testing.assert_close(static.aux, dynamic.aux)
    assert (n_dead > 0) == bool(static.aux > 0)
    assert torch.equal(static.fired, dynamic.fired)
    total = grads(module, static.mse + static.aux)
    reference = grads(module, dynamic.mse + dynamic.aux)
    for name, grad in reference.items():
        torch.testing.assert_close(total[name], grad, rtol=1e-5, atol=1e-6, msg=name)
