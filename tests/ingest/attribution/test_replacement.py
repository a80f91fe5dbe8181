"""The replacement model's compatibility check, with its per-pair cache."""

import pytest
import torch

from ingest.attribution.replacement import build_replacement, check_compatible
from ingest.errors import InvalidArgumentError

from . import models as m

pytestmark = pytest.mark.unit


def test_set_for_another_model_is_rejected_even_after_a_cached_check() -> None:
    own = m.adapter("gpt2", torch.float64, seed=0)
    other = m.adapter("gpt2", torch.float64, seed=1)  # same shapes, other weights
    tcs = m.transcoder_set(own)
    check_compatible(own, tcs)
    check_compatible(own, tcs)  # cached: no second hash
    with pytest.raises(InvalidArgumentError, match="fingerprint"):
        check_compatible(other, tcs)
    with pytest.raises(InvalidArgumentError, match="fingerprint"):
        build_replacement(other, tcs, torch.tensor([[3, 4, 5]]))


def test_sae_sets_cannot_drive_attribution() -> None:
    adp = m.adapter("llama", torch.float64)
    tcs = m.transcoder_set(adp)
    tcs.metadata.kind = "sae"
    with pytest.raises(InvalidArgumentError, match="SAE"):
        check_compatible(adp, tcs)
