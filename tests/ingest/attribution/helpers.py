"""Small builders shared by the attribution tests."""

import torch

from ingest.attribution.layout import NodeLayout
from ingest.attribution.result import AttributionResult
from ingest.graph import (
    GraphMetadata,
    Node,
    NodeKind,
    error_node_id,
    feature_node_id,
    logit_node_id,
    token_node_id,
)


def synthetic_result(seed: int = 0, n_layers: int = 2, n_tokens: int = 3) -> AttributionResult:
    """A random but causally consistent dense graph over a 2-layer toy model.

    Features (layer, index, pos) read tokens, errors and features of earlier layers at
    positions <= their own; logits at the last position read everything.
    """
    gen = torch.Generator().manual_seed(seed)
    feats = [(0, 0, 0), (0, 5, 1), (0, 1, 2), (1, 0, 2), (1, 3, 1)]
    errs = [(layer, pos) for layer in range(n_layers) for pos in range(n_tokens)]
    toks = [(7 + pos, pos) for pos in range(n_tokens)]
    logit_tokens = [4, 9]
    layout = NodeLayout(len(feats), len(errs), len(toks), len(logit_tokens))
    nodes = [
        Node(
            feature_node_id(lyr, idx, pos),
            NodeKind.FEATURE,
            lyr,
            pos,
            feature=idx,
            activation=float(torch.rand(1, generator=gen)) + 0.1,
        )
        for lyr, idx, pos in feats
    ]
    nodes += [Node(error_node_id(lyr, pos), NodeKind.ERROR, lyr, pos) for lyr, pos in errs]
    nodes += [
        Node(token_node_id(tok, pos), NodeKind.TOKEN, None, pos, token_id=tok, token=f"t{pos}")
        for tok, pos in toks
    ]
    probs = torch.tensor([0.7, 0.2], dtype=torch.float32)
    nodes += [
        Node(
            logit_node_id(n_layers, tok, n_tokens - 1),
            NodeKind.LOGIT,
            n_layers,
            n_tokens - 1,
            token_id=tok,
            token=f"out{tok}",
            token_prob=float(p),
        )
        for tok, p in zip(logit_tokens, probs.tolist(), strict=True)
    ]

    def layer_pos(i: int) -> tuple[float, int]:
        node = nodes[i]
        if node.kind is NodeKind.TOKEN:
            return -1.0, node.pos
        return float(node.layer or 0) + (0.5 if node.kind is NodeKind.LOGIT else 0.0), node.pos

    a = torch.zeros(layout.n, layout.n)
    targets = list(range(layout.features.stop)) + list(range(layout.logits.start, layout.n))
    for t in targets:
        lt, pt = layer_pos(t)
        for s in range(layout.n_sources):
            ls, ps = layer_pos(s)
            if ls < lt and ps <= pt:
                a[t, s] = float(torch.randn(1, generator=gen))
    meta = GraphMetadata(
        graph_id=f"synthetic-{seed}",
        model_id="toy",
        set_id="toy/tc",
        prompt="a b c",
        tokens=[f"t{p}" for p in range(n_tokens)],
        token_ids=[7 + p for p in range(n_tokens)],
    )
    return AttributionResult(
        metadata=meta,
        layout=layout,
        nodes=nodes,
        adjacency=a,
        logit_probs=probs,
        n_layers=n_layers,
        stats={"n_backward_passes": 3},
    )
