"""``circuitscope model``: which model families are supported, and what a checkpoint is.

    circuitscope model families
    circuitscope model info PATH_OR_HUB_ID [--device D] [--dtype T] [--prompt TEXT]

``info`` loads the model through :func:`ingest.models.load_model`, prints its family,
sizes and fingerprint (the value transcoder sets are checked against), and with
``--prompt`` checks the adapter on that prompt: its logits against the HF forward (the
DESIGN 5.4 bar, max abs difference <= 1e-5 times the logit scale in float32) and a
frozen forward against the normal one. Exit code 1 when a check fails. Torch is
imported only when a subcommand runs.
"""

from __future__ import annotations

import argparse

DTYPES = ("float32", "float64", "bfloat16", "float16")


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser(
        "model",
        help="supported model families; inspect and check a checkpoint",
        description="Model adapters over Hugging Face causal LMs (docs/models.md).",
    )
    commands = model.add_subparsers(dest="model_command", metavar="MODEL_COMMAND", required=True)

    fams = commands.add_parser("families", help="supported families and HF model types")
    fams.set_defaults(handler=_families)

    info = commands.add_parser("info", help="family, sizes and fingerprint of a checkpoint")
    info.add_argument("model", help="checkpoint directory or hub id")
    info.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    info.add_argument("--dtype", choices=DTYPES, default="float32", help="load precision")
    info.add_argument("--prompt", default=None, help="check the adapter against HF on this prompt")
    info.set_defaults(handler=_info)


def _families(args: argparse.Namespace) -> int:
    from ingest.models.registry import families

    for family in families():
        print(f"{family.name:10s} {', '.join(family.model_types)}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import torch

    from ingest.models.loading import load_model

    loaded = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    adapter = loaded.adapter
    arch = adapter.architecture()
    parallel = sorted({bool(p) for p in adapter.parallel_residual})
    rows = [
        ("model", loaded.model_id),
        ("family", f"{adapter.family} (model_type {adapter.model_type})"),
        ("layers", adapter.n_layers),
        ("d_model / d_mlp", f"{adapter.d_model} / {adapter.d_mlp}"),
        (
            "heads / kv heads / d_head",
            f"{adapter.n_heads} / {adapter.n_kv_heads} / {adapter.d_head}",
        ),
        ("vocab / n_ctx", f"{adapter.vocab_size} / {adapter.n_ctx}"),
        ("positions", "learned" if adapter.W_pos is not None else "rotary"),
        ("parallel residual", "/".join(str(p) for p in parallel)),
        ("activation", arch["layers"][0]["act"]),  # type: ignore[index]
        ("device / dtype", f"{adapter.device} / {adapter.dtype}"),
        ("fingerprint", adapter.fingerprint()),
    ]
    for name, value in rows:
        print(f"{name:26s} {value}")
    if args.prompt is None:
        return 0
    return _check(loaded, args.prompt)


def _check(loaded, prompt: str) -> int:
    import torch

    from ingest.errors import InvalidArgumentError

    adapter, model = loaded.adapter, loaded.hf_model
    ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids.to(adapter.device)
    if ids.shape[1] == 0:
        raise InvalidArgumentError("the prompt has no tokens: give a non-empty --prompt")
    with torch.no_grad():
        rec = adapter(ids, record=True)
        expected = model(ids).logits
        frozen = adapter(ids, frozen=rec.frozen)
    scale = max(1.0, float(expected.abs().max()))
    hf_diff = float((rec.logits.double() - expected.double()).abs().max())
    frozen_diff = float((frozen.double() - rec.logits.double()).abs().max())
    bar = 1e-5 * scale if adapter.dtype in (torch.float32, torch.float64) else 5e-2 * scale
    ok = hf_diff <= bar and frozen_diff == 0.0
    print(f"{'tokens':26s} {ids.shape[1]}")
    unk = getattr(loaded.tokenizer, "unk_token_id", None)
    n_unk = int((ids == unk).sum()) if unk is not None else 0
    if n_unk and loaded.tokenizer.unk_token not in prompt:
        print(f"{'unknown-token ids':26s} {n_unk} (words outside the vocabulary; still checked)")
    print(f"{'max |adapter - HF|':26s} {hf_diff:.3g} (bar {bar:.3g})")
    print(f"{'max |frozen - normal|':26s} {frozen_diff:.3g}")
    print(f"{'check':26s} {'pass' if ok else 'FAIL'}")
    return 0 if ok else 1
