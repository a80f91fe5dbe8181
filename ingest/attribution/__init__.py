"""Attribution graphs: the local replacement model, attribution, pruning, export.

Pipeline stages, one module each (Ameisen et al. 2025, "Circuit Tracing: Revealing
Computational Graphs in Language Models"; DESIGN.md sections 5.2 to 5.6 and 8):

- ``layout``: the node order of dense matrices (features, errors, tokens, logits);
- ``pruning``: influence, node and edge pruning, replacement and completeness scores;
- ``result``: :class:`AttributionResult`, the dense graph and its node table;
- ``artifact``: the compact safetensors + JSON artifact (atomic writes);
- ``export``: the circuit-tracer / Neuronpedia graph JSON.

Importing this package is cheap (no torch); import the submodules for the API.
"""
