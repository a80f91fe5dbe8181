"""Where a layer's CE loss recovered comes from, prompt by prompt.

CE recovered, ``1 - (splice - clean) / (ablate - clean)``, divides two means over the
eval prompts. Where the layer's MLP barely matters (IOI's layer 1: ablation moves the
answer's loss by 1.35e-3 nats on average), a few prompts can carry both means. For one
layer of a zoo model and a transcoder set it computes, on every held-out prompt, the
answer's loss clean, with that layer's MLP replaced by the set's module (spliced), and
zero-ablated, and prints:

- the means and medians of the two changes, and CE recovered;
- the share of each total carried by the prompts with the largest changes;
- the name pairs (or, for other tasks, the answers) whose prompts carry the most of the
  splice's total, with CE recovered without them;
- the prompts with the largest splice changes.

    python3 benchmarks/per_prompt_ce.py --model ~/.cache/circuitscope/zoo/ioi-gpt2 \\
        --set ~/.cache/circuitscope/benchmarks/transcoders/ioi-gpt2-transcoder --layer 1
"""

import argparse
import datetime
import platform
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _cli import command_line, int_in, path, positive, run_main  # benchmarks/_cli.py
from _machine import cpu_name  # benchmarks/_machine.py

from ingest.errors import InvalidArgumentError
from ingest.models import load_model
from ingest.transcoders.formats import load_any
from ingest.zoo.checkpoint import read_manifest, task_for_spec


def group_of(prompt: str, answer: str, names: frozenset[str]) -> str:
    """The prompt's pair of names when it has two of ``names`` (IOI), else its answer."""
    found = sorted(names.intersection(re.findall(r"[A-Za-z]+", prompt)))
    return " / ".join(found) if len(found) == 2 else answer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=path, required=True, help="zoo model directory")
    parser.add_argument("--set", type=path, required=True, help="transcoder set directory")
    parser.add_argument("--layer", type=int_in(0), required=True)
    parser.add_argument("--split", choices=("train", "heldout"), default="heldout")
    parser.add_argument("--top", type=positive, default=8, help="groups and prompts listed")
    args = parser.parse_args()

    task = task_for_spec(read_manifest(args.model).spec)
    loaded = load_model(str(args.model))
    adapter, tokenizer = loaded.adapter, loaded.tokenizer
    tset = load_any(args.set)
    tset.check_fits(adapter)  # a set trained for another model: one line, exit 2
    if args.layer not in tset.layers:
        raise InvalidArgumentError(
            f"--layer {args.layer}: the set covers layers {tset.layers}; choose one of them"
        )
    module = tset.module(args.layer)
    examples = task.generate(args.split)
    by_length: dict[int, list[tuple[list[int], int, int]]] = defaultdict(list)
    for index, example in enumerate(examples):
        ids = tokenizer(example.prompt)["input_ids"]
        answer = tokenizer(example.answers[0])["input_ids"][-1]
        by_length[len(ids)].append((ids, answer, index))
    changes = torch.zeros(len(examples), 2, dtype=torch.float64)
    splice = {args.layer: module}
    ablate = {args.layer: torch.zeros_like}
    with torch.no_grad():
        for rows in by_length.values():
            for start in range(0, len(rows), 512):
                chunk = rows[start : start + 512]
                ids = torch.tensor([r[0] for r in chunk], device=adapter.device)
                answers = torch.tensor([r[1] for r in chunk], device=adapter.device)

                def loss(logits: torch.Tensor, answers: torch.Tensor = answers) -> torch.Tensor:
                    return F.cross_entropy(logits[:, -1].double(), answers, reduction="none")

                clean = loss(adapter(ids))
                spliced = loss(adapter(ids, mlp_replacements=splice)) - clean
                ablated = loss(adapter(ids, mlp_replacements=ablate)) - clean
                positions = torch.tensor([r[2] for r in chunk])
                changes[positions, 0] = spliced.cpu()
                changes[positions, 1] = ablated.cpu()
    d, a = changes[:, 0], changes[:, 1]

    def recovered(keep: torch.Tensor) -> float:
        return float(1 - d[keep].mean() / a[keep].mean())

    everything = torch.ones(len(examples), dtype=torch.bool)
    print(f"# Per-prompt CE changes: {args.model.name}, layer {args.layer}, {args.set.name}")
    print()
    print(f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%dT%H:%MZ}; machine: "
          f"{platform.node()}, {cpu_name()}, torch {torch.__version__}")  # fmt: skip
    print(f"- command: `{command_line()}`")
    print(f"- {len(examples)} {args.split} prompts; the answer's loss change in nats")
    print()
    print("| change | mean | median | CE recovered |")
    print("|---|---|---|---|")
    print(f"| spliced | {d.mean():.3e} | {d.median():.3e} | {recovered(everything):.3f} |")
    print(f"| zero-ablated | {a.mean():.3e} | {a.median():.3e} | |")
    print()
    print("| prompts with the largest changes | share of the splice total | "
          "share of the ablation total |")  # fmt: skip
    print("|---|---|---|")
    for name, order in (("splice", d.abs()), ("ablation", a.abs())):
        ranked = order.argsort(descending=True)
        for fraction in (0.01, 0.05):
            top = ranked[: max(1, int(len(examples) * fraction))]
            print(f"| top {fraction:.0%} by {name} | {float(d[top].sum() / d.sum()):.2f} | "
                  f"{float(a[top].sum() / a.sum()):.2f} |")  # fmt: skip
    names = frozenset(getattr(sys.modules[type(task).__module__], "NAMES", ()))
    groups: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        groups[group_of(example.prompt, example.answers[0], names)].append(index)
    for name, total in (("splice", d), ("ablation", a)):
        ranked_groups = sorted(groups.items(), key=lambda kv: -float(total[kv[1]].sum()))
        print()
        print(f"{len(groups)} groups (name pairs, or answers); those carrying the most of "
              f"the {name}'s total:")  # fmt: skip
        print()
        print("| group | prompts | share of the splice total | share of the ablation total | "
              "CE recovered without it |")  # fmt: skip
        print("|---|---|---|---|---|")
        for group, members in ranked_groups[: args.top]:
            keep = everything.clone()
            keep[members] = False
            print(f"| {group} | {len(members)} | {float(d[members].sum() / d.sum()):.3f} | "
                  f"{float(a[members].sum() / a.sum()):.3f} | {recovered(keep):.3f} |")  # fmt: skip
    print()
    print("| spliced | zero-ablated | prompt | answer |")
    print("|---|---|---|---|")
    for i in d.argsort(descending=True)[: args.top].tolist():
        print(f"| {d[i]:+.3e} | {a[i]:+.3e} | {examples[i].prompt} | {examples[i].answers[0]} |")
    return 0


if __name__ == "__main__":
    run_main(main)
