"""The train and pareto commands default to TrainConfig()'s fields: one set of defaults;
errors name the flag that sets a field; and the --layers syntax."""

import argparse
import re

import pytest

from ingest.errors import InvalidArgumentError
from ingest.transcoders.cli import _layers, _train_config
from ingest.transcoders.config import CLI_FIELDS, DEFAULT_BALANCE_RATE, TrainConfig, flagged
from service.cli import build_parser

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("command", ["train", "pareto"])
def test_command_line_defaults_are_the_trainers(command):
    argv = ["transcoders", command, "--model", "m", "--out", "o"]
    if command == "pareto":
        argv += ["--sparsities", "4"]
    args = build_parser().parse_args(argv)
    assert _train_config(args, None) == TrainConfig()


#: A value other than the default for every field a train flag sets, as typed and as parsed
SET_BY_FLAG = {
    "kind": ("clt", "clt"), "arch": ("topk", "topk"), "width": ("128", 128),
    "expansion": ("4", 4), "layers": ("0,1", (0, 1)), "steps": ("7", 7),
    "batch_size": ("64", 64), "lr": ("0.01", 0.01), "buffer_mb": ("64", 64.0),
    "buffer_rows": ("100", 100), "seed": ("5", 5), "eval_every": ("3", 3),
    "checkpoint_every": ("4", 4), "dead_after_tokens": ("99", 99),
    "aux_k_coefficient": ("0.5", 0.5), "aux_k_rows": ("8", 8), "resample_every": ("0", 0),
    "answer_weight": ("2", 2.0), "balance_rate": ("0.1", 0.1), "kl_steps": ("5", 5),
    "kl_lr": ("0.001", 0.001), "kl_coefficient": ("2", 2.0), "kl_batch": ("8", 8),
}  # fmt: skip


def test_every_flag_reaches_the_train_config():
    # a new field needs a row; the switches are checked below
    assert set(SET_BY_FLAG) | {"skip", "sparsity", "compile"} == CLI_FIELDS
    base = ["transcoders", "train", "--model", "m", "--out", "o"]
    for field, (text, value) in SET_BY_FLAG.items():
        args = build_parser().parse_args([*base, flagged(field).split(" (")[1][:-1], text])
        assert getattr(_train_config(args, None), field) == value, field
        assert getattr(TrainConfig(), field) != value, field
    args = build_parser().parse_args([*base, "--no-skip"])
    assert _train_config(args, None).skip is False
    args = build_parser().parse_args([*base, "--compile"])
    assert _train_config(args, None).compile is True


def test_layers_syntax():
    assert _layers("all") is None
    assert _layers("0,2") == (0, 2)
    assert _layers("0-3") == (0, 1, 2, 3)
    assert _layers("1,3-4") == (1, 3, 4)
    for bad in ("0-", "3-1", "-1", "a", "1,,2"):
        with pytest.raises(argparse.ArgumentTypeError, match="--layers"):
            _layers(bad)


def test_every_flagged_field_has_its_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["transcoders", "train", "--help"])
    usage = capsys.readouterr().out
    for field in CLI_FIELDS:
        flags = ["--skip", "--no-skip"] if field == "skip" else [flagged(field).split(" (")[1][:-1]]
        assert all(f"{flag} " in usage or f"{flag}\n" in usage for flag in flags), field


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 0}, "batch_size (--batch-size) must be positive"),
        ({"lr": 0.0}, "lr (--lr) must be > 0"),
        ({"resample_every": -1}, "resample_every (--resample-every)"),
        ({"eval_every": 0}, "eval_every (--eval-every)"),
        ({"buffer_rows": -1}, "buffer_rows (--buffer-rows)"),
        ({"arch": "topk", "balance_rate": 0.1}, "balance_rate (--balance-rate) is batchtopk's"),
        ({"balance_rate": 2.0}, "balance_rate (--balance-rate) must be in [0, 1]"),
        ({"kl_steps": -1}, "kl_steps (--kl-steps) must be >= 0"),
        ({"kl_lr": 0.0}, "kl_lr (--kl-lr) must be a finite number > 0"),
        ({"kl_batch": 0}, "kl_batch (--kl-batch) (windows per end-to-end step)"),
        ({"model_batch_size": -1}, "model_batch_size must be"),  # no flag: the field alone
        ({"layers": "0,1"}, "layers (--layers) must be a non-empty sequence of layer numbers"),
        ({"layers": ()}, "layers (--layers) must be a non-empty sequence"),
        ({"layers": (0, -1)}, "layers (--layers) must be a non-empty sequence"),
        ({"layers": (0, 1.0)}, "layers (--layers) must be a non-empty sequence"),
    ],
)
def test_config_errors_name_the_flag(change, message):
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        TrainConfig(**change)


def test_layers_given_as_any_sequence_of_ints_become_a_tuple():
    assert TrainConfig(layers=[1, 0]).layers == (1, 0)
    assert TrainConfig(layers=range(2)).layers == (0, 1)  # type: ignore[arg-type]


def test_the_firing_floor_is_on_by_default_for_batchtopk_only():
    assert TrainConfig().module_config(64).balance_rate == DEFAULT_BALANCE_RATE > 0
    assert TrainConfig(balance_rate=0.0).module_config(64).balance_rate == 0.0
    assert TrainConfig(arch="topk").module_config(64).balance_rate == 0.0
