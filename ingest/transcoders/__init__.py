"""Transcoders: sparse replacements of a transformer's MLP sublayers.

A transcoder reads the normalized residual an MLP reads and predicts the MLP's output
through a wide, sparsely active hidden layer (Dunefsky et al. 2024, "Transcoders Find
Interpretable LLM Feature Circuits"; Anthropic 2025, "Circuit Tracing"). The package is
laid out by pipeline stage:

- ``registry``, ``config``, ``architectures``: the activation functions and their
  sparsity penalties (ReLU + L1, TopK + AuxK, JumpReLU + L0, BatchTopK + AuxK, the
  default) behind one registry; ``sparse``: the TopK and BatchTopK training step;
- ``transcoder``, ``clt``, ``transcoder_set``: per-layer and cross-layer modules and the
  set over all layers that the replacement model and attribution use;
- ``sources``, ``buffer``: prompt sources and the bounded, shuffled activation buffer;
- ``trainer``, ``checkpoint``: deterministic, resumable training;
- ``evaluation``, ``pareto``, ``feature_stats``: metrics, sparsity sweeps, per-latent
  statistics;
- ``formats``: circuit-tracer, SAELens and sparsify layouts, and the native layout;
- ``cli``: the ``circuitscope transcoders`` subcommands.

Importing this package is cheap: it imports no torch.
"""
