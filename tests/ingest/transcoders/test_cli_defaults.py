"""The train and pareto commands default to TrainConfig()'s fields: one set of defaults;
and the --layers syntax."""

import argparse

import pytest

from ingest.transcoders.cli import _layers, _train_config
from ingest.transcoders.config import TrainConfig
from service.cli import build_parser

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("command", ["train", "pareto"])
def test_command_line_defaults_are_the_trainers(command):
    argv = ["transcoders", command, "--model", "m", "--out", "o"]
    if command == "pareto":
        argv += ["--sparsities", "4"]
    args = build_parser().parse_args(argv)
    assert _train_config(args, None) == TrainConfig()


def test_layers_syntax():
    assert _layers("all") is None
    assert _layers("0,2") == (0, 2)
    assert _layers("0-3") == (0, 1, 2, 3)
    assert _layers("1,3-4") == (1, 3, 4)
    for bad in ("0-", "3-1", "-1", "a", "1,,2"):
        with pytest.raises(argparse.ArgumentTypeError, match="--layers"):
            _layers(bad)
