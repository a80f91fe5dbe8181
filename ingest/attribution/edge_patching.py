"""Edge-level counterfactual patching in the linearized replacement model.

MIB (Mueller et al. 2025) evaluates a circuit by patching *edges*: each node's input
takes the clean contribution of its in-circuit edges and the counterfactual
contribution of the others. In the prompt's frozen local replacement model, the
contribution of source ``u`` to target ``v`` is exactly the graph edge
``A[v, u] = x_u^T J e_v`` (``x_u`` the vector ``u`` writes); with ``u``'s
counterfactual vector it is ``A_cf[v, u] = A[v, u] + dA[v, u]``, ``dA`` computed by the
same batched backward passes (:func:`counterfactual_edge_deltas`). So, with
``b_v = pre_v - sum_u A[v, u]`` (row completeness), a circuit ``C`` of edges gives, in
topological (layer) order,

    pre_v(C) = b_v + sum_{u->v in C} r_u A[v, u] + sum_{u->v not in C} A_cf[v, u]
    a_v(C)   = max(pre_v(C), 0),   r_v = a_v(C) / a_v(clean)

(tokens and errors keep ``r = 1``), and ``m(C)`` is the metric row's value. All edges in
``C`` reproduce the clean metric exactly; none give the linearized counterfactual
metric. Features inactive on the clean prompt are not graph nodes and stay off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ingest.attribution.replacement import ReplacementState
from ingest.attribution.result import AttributionResult
from ingest.attribution.rows import ActiveFeatures, Row, RowComputer
from ingest.errors import InvalidArgumentError
from ingest.models import ModelAdapter
from ingest.transcoders.transcoder_set import TranscoderSet


def logit_diff_tokens(result: AttributionResult) -> tuple[int, int]:
    """(correct, counterfactual) of a graph computed for a logit-difference target."""
    targets = result.nodes[result.layout.logits]
    label = targets[0].label if len(targets) == 1 else None
    if not label or not label.startswith("logit diff "):
        raise InvalidArgumentError(
            "this needs a graph computed for a logit-difference target: attribute with "
            "target=LogitDiffTarget(correct, counterfactual)"
        )
    a, b = (int(x) for x in label.removeprefix("logit diff ").split(" - "))
    return a, b


def counterfactual_edge_deltas(
    adapter: ModelAdapter,
    transcoders: TranscoderSet,
    result: AttributionResult,
    clean: ReplacementState,
    counterfactual: ReplacementState,
    batch_size: int = 64,
) -> Tensor:
    """``dA[v, u] = (x_u^cf - x_u)^T J e_v`` through the clean frozen model: (n, n) float64.

    Rows: the graph's feature targets and its logit-difference target.
    """
    correct, wrong = logit_diff_tokens(result)
    if counterfactual.n_tokens != clean.n_tokens:
        raise InvalidArgumentError(
            f"the counterfactual prompt has {counterfactual.n_tokens} tokens, the prompt "
            f"{clean.n_tokens}: patching needs prompts of the same length"
        )
    lay = result.layout
    feats = result.nodes[lay.features]
    layer = torch.tensor([int(n.layer or 0) for n in feats], dtype=torch.long)
    pos = torch.tensor([n.pos for n in feats], dtype=torch.long)
    index = torch.tensor([int(n.feature or 0) for n in feats], dtype=torch.long)
    delta = torch.tensor(
        [
            float(counterfactual.activations[lyr][p, i] - clean.activations[lyr][p, i])
            for lyr, p, i in zip(layer.tolist(), pos.tolist(), index.tolist(), strict=True)
        ],
        dtype=adapter.dtype,
        device=adapter.device,
    )
    computer = RowComputer(
        adapter, transcoders, clean, ActiveFeatures(layer, pos, index, delta), batch_size
    )
    computer.token_vectors = (counterfactual.resid0 - clean.resid0)[0]
    computer.error_vectors = [
        (c - k)[0] for c, k in zip(counterfactual.errors, clean.errors, strict=True)
    ]
    rows = [
        Row(lyr, p, transcoders.encoder_vectors(lyr, torch.tensor([i]))[0].detach())
        for lyr, p, i in zip(layer.tolist(), pos.tolist(), index.tolist(), strict=True)
    ]
    rows.append(Row(None, clean.n_tokens - 1, adapter.W_U[:, correct] - adapter.W_U[:, wrong]))
    out = torch.zeros(lay.n, lay.n, dtype=torch.float64)
    target_index = [*range(lay.n_features), lay.logits.start]
    out[target_index, : lay.n_sources] = computer.rows(rows).double()
    return out


@dataclass
class LinearizedPatching:
    """Evaluates ``m(C)`` for edge sets ``C`` (see the module docstring)."""

    result: AttributionResult
    delta: Tensor  # (n, n) float64
    bias: Tensor  # (n,) float64, for feature rows and the metric row
    clean_activation: Tensor  # (n_features,) float64

    @classmethod
    def build(
        cls,
        adapter: ModelAdapter,
        transcoders: TranscoderSet,
        result: AttributionResult,
        clean: ReplacementState,
        counterfactual: ReplacementState,
    ) -> LinearizedPatching:
        correct, wrong = logit_diff_tokens(result)
        delta = counterfactual_edge_deltas(adapter, transcoders, result, clean, counterfactual)
        lay = result.layout
        adjacency = result.adjacency.double()
        value = torch.zeros(lay.n, dtype=torch.float64)
        feats = result.nodes[lay.features]
        for i, node in enumerate(feats):
            value[i] = float(clean.pre_activations[int(node.layer or 0)][node.pos, node.feature])
        last = clean.logits[0, -1]
        value[lay.logits.start] = float(last[correct] - last[wrong])
        bias = value - adjacency.sum(dim=1)
        acts = torch.tensor([float(n.activation or 0.0) for n in feats], dtype=torch.float64)
        return cls(result=result, delta=delta, bias=bias, clean_activation=acts)

    def metric(self, keep: Tensor) -> float:
        """m(C) for the edge mask ``keep`` (n, n) bool (rows targets)."""
        lay = self.result.layout
        adjacency = self.result.adjacency.double()
        kept = adjacency * keep
        patched = ((adjacency + self.delta) * ~keep).sum(dim=1)  # (n,)
        ratio = torch.ones(lay.n, dtype=torch.float64)
        layers = torch.tensor([int(n.layer or 0) for n in self.result.nodes[lay.features]])
        for layer in torch.unique(layers).tolist():
            idx = torch.nonzero(layers == layer).flatten()
            pre = self.bias[idx] + kept[idx] @ ratio + patched[idx]
            act = pre.clamp_min(0.0)
            ratio[idx] = act / self.clean_activation[idx].clamp_min(1e-30)
        m = lay.logits.start
        return float(self.bias[m] + kept[m] @ ratio + patched[m])
