"""Attribution on a trained task-zoo checkpoint (IOI, GPT-2 architecture, tiny schedule).

The exactness checks of DESIGN 5.4 on a real trained model and its word-level tokenizer,
faithfulness on an IOI example with its counterfactual, and the unknown-word error.
"""

import pytest
import torch

from ingest.attribution.attribute import attribute
from ingest.attribution.faithfulness import compare_methods, logit_diff_metric
from ingest.attribution.replacement import build_replacement, replacement_logits
from ingest.attribution.targets import LogitDiffTarget
from ingest.errors import InvalidArgumentError
from ingest.models import load_model
from ingest.zoo.tasks import get_task
from ingest.zoo.trainer import train_zoo_model

from . import models as m
from .checks import assert_interventions, assert_row_completeness

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo") / "ioi-gpt2"
    train_zoo_model("ioi", "gpt2", tiny=True, out_dir=out, progress=False)
    loaded = load_model(str(out), dtype=torch.float64)
    tcs = m.transcoder_set(loaded.adapter, "clt", skip=True, d_transcoder=32)
    example = get_task("ioi").examples("heldout")[0]
    return loaded, tcs, example


def _ids(loaded, text: str) -> torch.Tensor:
    return torch.tensor([loaded.tokenizer(text)["input_ids"]])


def test_exactness_on_trained_model(zoo) -> None:
    loaded, tcs, example = zoo
    adp = loaded.adapter
    result = attribute(loaded, tcs, example.prompt, batch_size=32)
    assert result.metadata.prompt == example.prompt
    ids = _ids(loaded, example.prompt)
    state = build_replacement(adp, tcs, ids)
    logits = replacement_logits(adp, tcs, state)
    assert float((logits - state.logits).abs().max()) <= 1e-5 * float(state.logits.abs().max())
    assert_row_completeness(adp, tcs, state, result, 1e-5)
    assert_interventions(adp, tcs, state, result, 1e-5)


def test_faithfulness_on_ioi_example(zoo) -> None:
    loaded, tcs, example = zoo
    adp = loaded.adapter
    tok = loaded.tokenizer
    correct = tok(example.answers[0], add_special_tokens=False)["input_ids"][0]
    counter = tok(example.counterfactual_answers[0], add_special_tokens=False)["input_ids"][0]
    result = attribute(loaded, tcs, example.prompt, target=LogitDiffTarget(correct, counter))
    curves = compare_methods(
        adp, tcs, result, _ids(loaded, example.prompt),
        _ids(loaded, example.counterfactual_prompt), logit_diff_metric(correct, counter),
    )  # fmt: skip
    for curve in curves:
        assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-6)
        assert len(curve.faithfulness) == 10


def test_unknown_word_is_a_clear_error(zoo) -> None:
    loaded, tcs, example = zoo
    with pytest.raises(InvalidArgumentError, match="cannot encode"):
        attribute(loaded, tcs, example.prompt.replace("park", "xylophone"))
