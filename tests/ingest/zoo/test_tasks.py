"""Generators: deterministic, disjoint splits, counterfactuals that change the answer,
and answers that are right by the task's own definition."""

import re

import pytest

from ingest.zoo.task import Task
from ingest.zoo.tasks import IOI, TASKS, GreaterThan, Induction, ModularAddition
from ingest.zoo.tokenizer import UNK, build_tokenizer

FRESH: dict[str, type[Task]] = {
    "greater_than": GreaterThan,
    "modular_addition": ModularAddition,
    "ioi": IOI,
    "induction": Induction,
}


@pytest.mark.unit
@pytest.mark.parametrize("name", TASKS.names())
def test_generator_is_deterministic_and_splits_are_disjoint(name: str) -> None:
    task = TASKS.get(name)
    fresh = FRESH[name]()  # a new instance regenerates from scratch
    for split in ("train", "heldout"):
        assert task.examples(split) == fresh.examples(split)
    train, heldout = task.examples("train"), task.examples("heldout")
    assert len(train) > len(heldout) > 0
    assert not {e.key for e in train} & {e.key for e in heldout}
    assert not {e.prompt for e in train} & {e.prompt for e in heldout}


@pytest.mark.unit
@pytest.mark.parametrize("name", TASKS.names())
def test_keys_determine_examples_and_repeat_only_where_documented(name: str) -> None:
    task = TASKS.get(name)
    for split in ("train", "heldout"):
        examples = task.examples(split)
        by_key: dict[tuple[int, ...], object] = {}
        for example in examples:
            assert by_key.setdefault(example.key, example) == example  # equal key, equal example
        repeats = len(examples) - len(by_key)
        if task.unique_keys:
            assert repeats == 0, (name, split)
        else:
            # IOI keeps its random draws' rare repeats (module doc): these exact counts.
            assert (name, repeats) == ("ioi", {"train": 2, "heldout": 3}[split])


@pytest.mark.unit
@pytest.mark.parametrize("name", TASKS.names())
def test_counterfactuals_change_the_answer_and_keep_the_length(name: str) -> None:
    task = TASKS.get(name)
    tokenizer = build_tokenizer(task)
    examples = task.examples("heldout")[:200]
    for ex in examples:
        assert set(ex.answers) != set(ex.counterfactual_answers)
        assert ex.prompt != ex.counterfactual_prompt
        assert not set(ex.answers) & set(ex.wrong_answers)
    clean = tokenizer([e.prompt for e in examples])["input_ids"]
    corrupt = tokenizer([e.counterfactual_prompt for e in examples])["input_ids"]
    unk = tokenizer.convert_tokens_to_ids(UNK)
    for a, b in zip(clean, corrupt, strict=True):
        assert len(a) == len(b)
        assert unk not in a and unk not in b


@pytest.mark.unit
def test_greater_than_answers_are_the_later_years() -> None:
    for ex in TASKS.get("greater_than").examples("heldout")[:50]:
        match = re.fullmatch(
            r"The \w+ lasted from the year (\d\d)(\d\d) to the year (\d\d)", ex.prompt
        )
        assert match is not None and match.group(1) == match.group(3)
        yy = int(match.group(2))
        assert ex.answers == tuple(f"{z:02d}" for z in range(yy + 1, 100))
        assert ex.wrong_answers == tuple(f"{z:02d}" for z in range(yy + 1))
        assert ex.counterfactual_prompt.endswith(
            f"year {match.group(1)}01 to the year {match.group(1)}"
        )


@pytest.mark.unit
def test_modular_addition_answers_are_sums_and_heldout_pairs_are_unseen() -> None:
    task = ModularAddition(p=113, train_fraction=0.5)
    train, heldout = task.examples("train"), task.examples("heldout")
    assert len(train) + len(heldout) == 113 * 113
    for ex in heldout[:200]:
        a, b = (int(x) for x in ex.prompt.removesuffix(" =").split(" + "))
        a_cf, b_cf = (int(x) for x in ex.counterfactual_prompt.removesuffix(" =").split(" + "))
        assert ex.answers == (str((a + b) % 113),)
        assert a_cf == a and b_cf != b
        assert ex.counterfactual_answers == (str((a + b_cf) % 113),) == ex.wrong_answers


@pytest.mark.unit
def test_ioi_answer_is_the_name_mentioned_once() -> None:
    task = TASKS.get("ioi")
    for ex in task.examples("heldout")[:200]:
        words = re.findall(r"\w+", ex.prompt)
        (io,) = ex.answers
        (subject,) = ex.wrong_answers
        assert words.count(io) == 1 and words.count(subject) == 2
        cf_words = re.findall(r"\w+", ex.counterfactual_prompt)
        (third,) = ex.counterfactual_answers
        assert cf_words.count(third) == 1 and io not in cf_words


@pytest.mark.unit
def test_induction_answer_is_copied_from_the_first_half() -> None:
    task = Induction(n_tokens=50, half_length=8, n_train=300, n_heldout=50)
    for ex in task.examples("heldout"):
        words = ex.prompt.split()
        assert len(words) == 15 and len(set(words[:8])) == 8
        assert words[8:] == words[:7] and ex.answers == (words[7],)
        cf = ex.counterfactual_prompt.split()
        assert cf[8:] == cf[:7] and ex.counterfactual_answers == (cf[7],)
