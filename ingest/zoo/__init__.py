"""The task zoo: small transformers trained on synthetic tasks with known circuits.

Without a model hub, the project trains its own models (DESIGN section 6): greater-than
(Hanna et al. 2023), modular addition (Nanda et al. 2023), IOI (Wang et al. 2023) and
induction (Olsson et al. 2022), each on GPT-2, GPT-NeoX or Llama configs, saved as
ordinary Hugging Face checkpoints with a word-level tokenizer and a ``zoo.json``.

Entry points (imported lazily, since they pull in torch and transformers):

- :func:`ingest.zoo.trainer.train_zoo_model` (``tiny=True`` for seconds-long test models)
- :func:`ingest.zoo.checkpoint.load_zoo_model`, :func:`ingest.zoo.checkpoint.evaluate_checkpoint`
- :data:`ingest.zoo.tasks.TASKS`, :data:`ingest.zoo.architectures.ARCHITECTURES`
"""
