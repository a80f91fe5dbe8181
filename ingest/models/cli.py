"""``circuitscope model``: which model families are supported, and what a checkpoint is.

    circuitscope model families
    circuitscope model info PATH_OR_HUB_ID [--device D] [--dtype T] [--prompt TEXT]

``info`` loads the model through :func:`ingest.models.load_model`, prints its family,
sizes and fingerprint (the value transcoder sets are checked against), and with
``--prompt`` checks the adapter on that prompt, and that a frozen forward reproduces the
normal one bit for bit. Exit code 1 when a check fails. Torch is imported only when a
subcommand runs.

The logits check depends on the precision:

- float32 / float64: max |adapter - HF| <= 1e-5 x the logit scale (the DESIGN 5.4 bar;
  HF's own float32 error is that size).
- bfloat16 / float16: the adapter and HF round at different places (HF fuses biases into
  its matmuls, the adapter adds them after), so on a model with large activations they
  can differ by more than either differs from the exact result. Both are measured against
  a float64 reference, the HF forward of a float64 copy of the loaded model (the same
  rounded weights, so only the arithmetic differs), and the check asks
  ``err(adapter) <= HALF_ERROR_RATIO * (err(HF) + eps * scale)``: the adapter may be a
  few times less exact than HF's own half-precision forward, plus one rounding step of
  the dtype (``eps``, 2^-7 for bfloat16, 2^-10 for float16) at the logit scale. On 960
  random stress models and prompts the largest ratio seen was 2.8. A missing
  ``1/sqrt(d_head)`` or a head-layout mistake fails it by far; a mistake smaller than the
  dtype's own noise cannot show, which is what the float32 check is for. The reference
  costs a float64 copy of the model (8 bytes per parameter) for the duration of the check.
"""

from __future__ import annotations

import argparse

DTYPES = ("float32", "float64", "bfloat16", "float16")
EXACT_BAR = 1e-5  # x the logit scale: float32 / float64 adapter vs HF
HALF_ERROR_RATIO = 4.0  # bfloat16 / float16: adapter error vs HF's own (see above)


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
    info.add_argument(
        "--no-progress", action="store_true", help="no progress bar while the weights load"
    )
    info.set_defaults(handler=_info)


def _families(args: argparse.Namespace) -> int:
    from ingest.models.registry import families

    for family in families():
        print(f"{family.name:10s} {', '.join(family.model_types)}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import torch

    from ingest.errors import InvalidArgumentError
    from ingest.models.loading import load_model

    if args.prompt is not None and not args.prompt.strip():
        raise InvalidArgumentError("--prompt is empty: give text to check the adapter on")
    loaded = load_model(
        args.model,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        progress=not args.no_progress,
    )
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
    hf_diff = float((rec.logits.double() - expected.double()).abs().max())
    frozen_diff = float((frozen.double() - rec.logits.double()).abs().max())
    print(f"{'tokens':26s} {ids.shape[1]}")
    unk = getattr(loaded.tokenizer, "unk_token_id", None)
    n_unk = int((ids == unk).sum()) if unk is not None else 0
    if n_unk and loaded.tokenizer.unk_token not in prompt:
        print(f"{'unknown-token ids':26s} {n_unk} (words outside the vocabulary; still checked)")
    if adapter.dtype in (torch.float32, torch.float64):
        scale = max(1.0, float(expected.abs().max()))
        bar = EXACT_BAR * scale
        print(f"{'max |adapter - HF|':26s} {hf_diff:.3g} (bar {bar:.3g})")
        logits_ok = hf_diff <= bar
    else:
        logits_ok = _check_half(model, ids, rec.logits, expected, hf_diff)
    ok = logits_ok and frozen_diff == 0.0
    print(f"{'max |frozen - normal|':26s} {frozen_diff:.3g}")
    print(f"{'check':26s} {'pass' if ok else 'FAIL'}")
    return 0 if ok else 1


def _check_half(model, ids, logits, expected, hf_diff: float) -> bool:
    """Half precision: the adapter's ``logits`` and HF's ``expected`` (B, T, V) each
    against the float64 forward of a copy of ``model``; see the module docstring."""
    import copy

    import torch

    reference = copy.deepcopy(model).to(torch.float64)
    with torch.no_grad():
        truth = reference(ids).logits  # (B, T, V)
    del reference
    scale = max(1.0, float(truth.abs().max()))
    adapter_err = float((logits.double() - truth).abs().max())
    hf_err = float((expected.double() - truth).abs().max())
    eps = torch.finfo(logits.dtype).eps
    bar = HALF_ERROR_RATIO * (hf_err + eps * scale)
    print(f"{'max |adapter - HF|':26s} {hf_diff:.3g}")
    print(f"{'max |HF - float64|':26s} {hf_err:.3g}")
    print(
        f"{'max |adapter - float64|':26s} {adapter_err:.3g} "
        f"(bar {bar:.3g} = {HALF_ERROR_RATIO:g} x (HF's {hf_err:.3g} + {eps:.3g} x {scale:.3g}))"
    )
    return adapter_err <= bar
