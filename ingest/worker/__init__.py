"""The ingest worker: prompts in, full graph artifacts on disk and pruned graphs in the store.

See :mod:`ingest.worker.worker` for the pipeline and its guarantees.
"""
