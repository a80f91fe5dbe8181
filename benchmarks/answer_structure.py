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

    python3 benchmarks/answer_structure.py --model ~/.cache/circuitscope/zoo/modular_addition-neox
"""

import argparse
import datetime
import platform
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import cpu_name  # benchmarks/_machine.py

from ingest.models import load_model
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="zoo model directory")
    parser.add_argument("--split", choices=("train", "heldout"), default="train")
    parser.add_argument("--max-prompts", type=int, default=20_000)
    args = parser.parse_args()

    task = task_for_spec(read_manifest(args.model).spec)
    loaded = load_model(str(args.model))
    adapter, tokenizer = loaded.adapter, loaded.tokenizer
    examples = task.generate(args.split)[: args.max_prompts]
    answer_ids: dict[str, int] = {}
    by_length: dict[int, list[tuple[list[int], int]]] = defaultdict(list)
    for example in examples:
        ids = tokenizer(example.prompt)["input_ids"]
        group = answer_ids.setdefault(example.answers[0], len(answer_ids))
        by_length[len(ids)].append((ids, group))
    layers = list(range(len(adapter.iter_blocks())))
    inputs: dict[int, list[torch.Tensor]] = defaultdict(list)
    outputs: dict[int, list[torch.Tensor]] = defaultdict(list)
    groups: list[int] = []
    with torch.no_grad():
        for rows in by_length.values():
            for start in range(0, len(rows), 1024):
                chunk = rows[start : start + 1024]
                ids = torch.tensor([r[0] for r in chunk], device=adapter.device)
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
    print(f"- command: `python3 benchmarks/answer_structure.py --model {args.model}`")
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


if __name__ == "__main__":
    main()
