"""Exactness checks of attribution graphs (DESIGN 5.4), shared by the test modules."""

import torch

from ingest.attribution.replacement import replacement_constants, replacement_mlps
from ingest.attribution.result import AttributionResult
from ingest.graph import NodeKind


def values(adp, tcs, state, result, resid0, constants, injections) -> torch.Tensor:
    """Every target row's value in the frozen replacement model: (n_targets,)."""
    captured: list[torch.Tensor] = []
    mlps = replacement_mlps(tcs, constants, injections, captured)
    with torch.no_grad():
        rec = adp(resid0=resid0, frozen=state.frozen, mlp_replacements=mlps, record=True)
    lay = result.layout
    out = []
    for node in result.nodes[lay.features]:
        enc = tcs.W_enc(node.layer)[node.feature]
        out.append(captured[node.layer][0, node.pos] @ enc + tcs.b_enc(node.layer)[node.feature])
    last = rec.logits[0, -1]
    for node in result.nodes[lay.logits]:
        if node.label and node.label.startswith("logit diff"):
            a, b = (int(x) for x in node.label.removeprefix("logit diff ").split(" - "))
            out.append(last[a] - last[b])
        else:
            out.append(last[node.token_id] - last.mean())
    return torch.stack(out).detach()


def zero_constants(adp, tcs, state) -> list[torch.Tensor]:
    """Constants with every source removed: only the transcoders' output biases remain."""
    out = []
    for layer in range(adp.n_layers):
        c = torch.zeros_like(state.mlp_out[layer])
        if layer in tcs.layers:
            c = c + tcs.b_dec(layer)
        out.append(c)
    return out


def target_rows(result: AttributionResult) -> torch.Tensor:
    lay = result.layout
    idx = list(range(lay.features.start, lay.features.stop))
    idx += list(range(lay.logits.start, lay.logits.stop))
    return result.adjacency[idx][:, : lay.n_sources]


def inject(adp, tcs, state, result, source: int):
    """resid0 and per-layer injections (1, T, d) that add source ``source``'s vector once."""
    resid0 = state.resid0.clone()
    inj = [torch.zeros_like(state.mlp_out[0]) for _ in range(adp.n_layers)]
    node = result.nodes[source]
    if node.kind is NodeKind.FEATURE:
        for target in tcs.targets(node.layer):
            inj[target][0, node.pos] += (
                node.activation * tcs.W_dec(node.layer, target)[node.feature]
            )
    elif node.kind is NodeKind.ERROR:
        inj[node.layer][0, node.pos] += state.errors[node.layer][0, node.pos]
    else:
        resid0[0, node.pos] += state.resid0[0, node.pos]
    return resid0, inj


def assert_row_completeness(adp, tcs, state, result: AttributionResult, tol: float) -> None:
    """Each target's incoming edges plus its bias terms equal its value (relative ``tol``)."""
    actual = values(adp, tcs, state, result, state.resid0, replacement_constants(state, tcs), None)
    zero = torch.zeros_like(state.resid0)
    bias = values(adp, tcs, state, result, zero, zero_constants(adp, tcs, state), None)
    rows = target_rows(result).to(actual)  # the graph lives on the CPU, values on the device
    lay = result.layout
    for node, value in zip(result.nodes[lay.features], actual, strict=False):
        recorded = float(state.pre_activations[node.layer][node.pos, node.feature])
        assert abs(float(value) - recorded) <= 1e-4 * max(1.0, abs(recorded))
    scale = max(float(actual.abs().max()), 1.0)
    assert float((rows.sum(dim=1) + bias - actual).abs().max()) <= tol * scale


def assert_interventions(adp, tcs, state, result: AttributionResult, tol: float, seed=0) -> None:
    """Adding a source's vector in the frozen model moves every target by its edge."""
    constants = replacement_constants(state, tcs)
    base = values(adp, tcs, state, result, state.resid0, constants, None)
    rows = target_rows(result)
    lay = result.layout
    gen = torch.Generator().manual_seed(seed)
    live = torch.nonzero(rows[:, : lay.n_features].abs().sum(0)).flatten()
    assert live.numel() > 0
    sources = live[torch.randperm(live.numel(), generator=gen)[:6]].tolist()
    sources += [lay.errors.start, lay.errors.start + 3, lay.errors.stop - 1]
    sources += [lay.tokens.start, lay.tokens.stop - 1]
    scale = max(float(base.abs().max()), 1.0)
    for s in sources:
        resid0, inj = inject(adp, tcs, state, result, s)
        moved = values(adp, tcs, state, result, resid0, constants, inj) - base
        assert float((moved - rows[:, s].to(moved)).abs().max()) <= tol * scale, s
