"""How much of each layer's MLP input and output is a function of the answer.

For a zoo model trained on an answer-only task it collects every layer's MLP input and
output at the answer-predicting position of the task's prompts and reports, per layer:

- R^2 by answer: the share of the variance (about the mean) that the per-answer means
  explain, with prompts grouped by their first correct answer;
- the principal components that hold 90% and 99% of the variance.

It explains where a transcoder at very low L0 trails the SAE on the same layer
(docs/transcoders_measurements.md, "Transcoders against SAEs"): the SAE's encoder reads
the output, the transcoder's the input, and what of the input is not the answer competes
for the few active latents.

With ``--sets DIR ...`` (transcoder sets or SAEs of the model) it also reports, per set
and covered layer, how answer-specific the latents are on the same prompts:

- L0 at the answer;
- answer R^2 of the latents: the share of each latent's activation variance that the
  answer explains (as above, per latent), averaged over latents weighted by their
  activation mass: 1 when every latent is a function of the answer alone;
- answer purity: the share of a latent's activation mass (its summed activations) that
  falls on its most frequent answer, averaged the same way (1: each latent fires for one
  answer only; 1 / answers: no preference), and the share of each prompt's activation
  mass on latents whose top answer is its own.

With ``--cyclic P`` (answers are the residues 0..P-1, modular addition) the latents'
mean activation as a function of the answer is also read in the Fourier basis of the
residues: the share of its power (without the mean) at its strongest frequency and the
effective number of frequencies (exp of the power's entropy), both weighted by mass;
and, with each set spliced into the model alone, the prompts whose top-1 answer changes
and the distances (mod P, either way) from the model's answer to the spliced one.

    python3 benchmarks/answer_structure.py --model ~/.cache/circuitscope/zoo/modular_addition-neox \
        [--sets TRANSCODER_DIR SAE_DIR ...]
"""

import argparse
import datetime
import platform
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _cli import command_line, int_in, path, positive, run_main  # benchmarks/_cli.py
from _machine import cpu_name  # benchmarks/_machine.py

from ingest.models import load_model
from ingest.transcoders.evaluation import all_layer_replacements
from ingest.transcoders.formats import load_any
from ingest.transcoders.transcoder_set import TranscoderSet
from ingest.zoo.checkpoint import read_manifest, task_for_spec


def r2_by_group(values: torch.Tensor, groups: torch.Tensor) -> float:
    centred = values - values.mean(0)
    n_groups = int(groups.max()) + 1
    sums = torch.zeros(n_groups, values.shape[1], dtype=values.dtype).index_add_(0, groups, centred)
    counts = torch.bincount(groups, minlength=n_groups).clamp(min=1)
    means = sums / counts[:, None]
    return float((means[groups] ** 2).sum() / (centred**2).sum())


def components(values: torch.Tensor, share: float) -> int:
    energy = torch.linalg.svdvals(values - values.mean(0)) ** 2
    return int((torch.cumsum(energy, 0) / energy.sum() < share).sum()) + 1


def answer_purity(acts: torch.Tensor, groups: torch.Tensor) -> dict[str, float]:
    """acts: (N, w) activations, groups: (N,) answer ids -> L0, and over the latents,
    weighted by activation mass: the answer's R^2 of each latent, its answer purity, and
    per prompt the mass share on latents whose top answer is the prompt's."""
    n_groups = int(groups.max()) + 1
    mass = torch.zeros(n_groups, acts.shape[1], dtype=acts.dtype).index_add_(0, groups, acts)
    per_latent = mass.sum(0)
    weight = per_latent / per_latent.sum()
    counts = torch.bincount(groups, minlength=n_groups).clamp(min=1)
    centred_means = mass / counts[:, None] - acts.mean(0)
    explained = (centred_means[groups] ** 2).sum(0)
    total = ((acts - acts.mean(0)) ** 2).sum(0).clamp_min(1e-12)
    top_mass, top_answer = mass.max(0)
    on_answer = (acts > 0) & (top_answer[None, :] == groups[:, None])
    share = (acts * on_answer).sum(1) / acts.sum(1).clamp_min(1e-12)
    return {
        "l0": float((acts > 0).sum(1).double().mean()),
        "r2": float((weight * explained / total).sum()),
        "purity": float(top_mass.sum() / per_latent.sum()),
        "answer_share": float(share.mean()),
    }


def fourier_spread(acts: torch.Tensor, answers: torch.Tensor, p: int) -> tuple[float, float]:
    """acts: (N, w), answers: (N,) residues mod p -> over the latents, weighted by mass:
    the share of the power of a latent's mean activation per answer at its strongest
    nonzero frequency, and its effective number of frequencies."""
    mass = torch.zeros(p, acts.shape[1], dtype=acts.dtype).index_add_(0, answers, acts)
    means = mass / torch.bincount(answers, minlength=p).clamp(min=1)[:, None]
    power = torch.fft.rfft(means - means.mean(0), dim=0).abs().pow(2)[1:]
    share = power / power.sum(0).clamp_min(1e-30)
    effective = torch.exp(-(share * share.clamp_min(1e-30).log()).sum(0))
    weight = mass.sum(0) / mass.sum()
    return float((weight * share.max(0).values).sum()), float((weight * effective).sum())


def flip_distances(
    adapter: Any, tset: TranscoderSet, chunks: list[torch.Tensor], tokenizer: Any, p: int
) -> tuple[int, Counter[int]]:
    """Prompts whose top-1 next token changes with ``tset`` spliced in, and how far (mod
    p, the shorter way) the spliced answer lies from the model's."""
    replacements = all_layer_replacements(adapter, tset)
    distances: Counter[int] = Counter()
    with torch.no_grad():
        for ids in chunks:
            clean = adapter.forward(ids)[:, -1].argmax(-1)
            out = adapter.forward(ids, mlp_replacements=replacements)
            spliced = out[:, -1].argmax(-1)
            changed = clean != spliced
            for a, b in zip(clean[changed].tolist(), spliced[changed].tolist(), strict=True):
                d = (int(tokenizer.decode([a])) - int(tokenizer.decode([b]))) % p
                distances[min(d, p - d)] += 1
    return sum(distances.values()), distances


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=path, required=True, help="zoo model directory")
    parser.add_argument("--split", choices=("train", "heldout"), default="train")
    parser.add_argument("--max-prompts", type=positive, default=20_000)
    parser.add_argument("--sets", type=path, nargs="*", default=[], help="transcoder sets, SAEs")
    parser.add_argument(
        "--cyclic", type=int_in(0), default=0, help="answers are residues mod P (0: not)"
    )
    args = parser.parse_args()

    task = task_for_spec(read_manifest(args.model).spec)
    loaded = load_model(str(args.model))
    adapter, tokenizer = loaded.adapter, loaded.tokenizer
    tsets = [load_any(p) for p in args.sets]
    for tset in tsets:
        tset.check_fits(adapter)  # a set trained for another model: one line, exit 2
    examples = task.generate(args.split)[: args.max_prompts]
    answer_ids: dict[str, int] = {}
    by_length: dict[int, list[tuple[list[int], int]]] = defaultdict(list)
    for example in examples:
        ids = tokenizer(example.prompt)["input_ids"]
        answer = example.answers[0]
        group = int(answer) if args.cyclic else answer_ids.setdefault(answer, len(answer_ids))
        answer_ids.setdefault(answer, group)
        by_length[len(ids)].append((ids, group))
    layers = list(range(len(adapter.iter_blocks())))
    inputs: dict[int, list[torch.Tensor]] = defaultdict(list)
    outputs: dict[int, list[torch.Tensor]] = defaultdict(list)
    groups: list[int] = []
    chunks: list[torch.Tensor] = []
    with torch.no_grad():
        for rows in by_length.values():
            for start in range(0, len(rows), 1024):
                chunk = rows[start : start + 1024]
                ids = torch.tensor([r[0] for r in chunk], device=adapter.device)
                chunks.append(ids)
                mlp_in, mlp_out = adapter.mlp_sites(ids, layers)
                for layer, x, y in zip(layers, mlp_in, mlp_out, strict=True):
                    inputs[layer].append(x[:, -1].double().cpu())
                    outputs[layer].append(y[:, -1].double().cpu())
                groups += [r[1] for r in chunk]
    group_ids = torch.tensor(groups)

    print(f"# MLP input and output at the answer: {args.model.name}")
    print()
    print(f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%dT%H:%MZ}; machine: "
          f"{platform.node()}, {cpu_name()}, torch {torch.__version__}")  # fmt: skip
    print(f"- command: `{command_line()}`")
    print(f"- {len(groups)} {args.split} prompts, {len(answer_ids)} distinct first answers")
    print()
    print("| layer | site | R^2 by answer | components 90% | components 99% |")
    print("|---|---|---|---|---|")
    for layer in layers:
        for site, values in (("input", inputs[layer]), ("output", outputs[layer])):
            v = torch.cat(values)
            print(
                f"| {layer} | {site} | {r2_by_group(v, group_ids):.3f} | "
                f"{components(v, 0.9)} | {components(v, 0.99)} |"
            )
    if not args.sets:
        return 0
    print()
    print(f"Latents at the answer ({len(answer_ids)} answers; purity 1 / answers = "
          f"{1 / len(answer_ids):.3f} means no preference):")  # fmt: skip
    print()
    print(
        "| set | kind | layer | L0 | answer R^2 of latents | answer purity | mass on own answer |"
    )
    print("|---|---|---|---|---|---|---|")
    encoded = []  # per set: (path, set, {layer: its activations at the answer})
    for set_dir, tset in zip(args.sets, tsets, strict=True):
        read = outputs if tset.kind == "sae" else inputs
        with torch.no_grad():
            acts = {
                layer: tset.encode(layer, torch.cat(read[layer]).to(tset.device, torch.float32))
                .double()
                .cpu()
                for layer in tset.layers
            }
        encoded.append((set_dir, tset, acts))
        for layer, layer_acts in acts.items():
            m = answer_purity(layer_acts, group_ids)
            print(
                f"| {set_dir.name} | {tset.kind} | {layer} | {m['l0']:.2f} | {m['r2']:.3f} | "
                f"{m['purity']:.3f} | {m['answer_share']:.3f} |"
            )
    if not args.cyclic:
        return 0
    print()
    print(f"In the Fourier basis of the {args.cyclic} residues, and spliced into the model:")
    print()
    print("| set | layer | top frequency's share | effective frequencies | top-1 changed | "
          "distances of the changed answers (count) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for set_dir, tset, acts in encoded:
        changed, distances = flip_distances(adapter, tset, chunks, tokenizer, args.cyclic)
        shown = ", ".join(f"{d} ({n})" for d, n in distances.most_common(6))
        for layer, layer_acts in acts.items():
            top, effective = fourier_spread(layer_acts, group_ids, args.cyclic)
            print(
                f"| {set_dir.name} | {layer} | {top:.3f} | {effective:.1f} | {changed} | {shown} |"
            )
    return 0


if __name__ == "__main__":
    run_main(main)
