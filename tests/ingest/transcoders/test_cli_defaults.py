"""The train and pareto commands default to TrainConfig()'s fields: one set of defaults."""

import pytest

from ingest.transcoders.cli import _train_config
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
