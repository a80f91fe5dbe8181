"""``circuitscope query`` input checks: every mistake is one line with exit code 2 (or an
argparse usage error), never a crash, a traceback or a silently ignored flag, and the
JSON on stdout is strict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ingest.errors import InvalidArgumentError
from ingest.paths import model_id
from service import query_cli
from service.cli import build_parser, main
from service.client import CircuitsClient, ClientTls
from tests.service.conftest import TOKEN
from tests.service.test_tls import _issue

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
PROMPT = "w2 w5 w7 w3"


def _strict_json(text: str) -> object:
    def refuse(name: str) -> object:
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str, out: str = "") -> str:
    captured = capsys.readouterr()
    assert captured.out == out
    err = captured.err.strip()
    assert err.startswith("circuitscope: error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIRCUITSCOPE_TOKEN", TOKEN)


@pytest.mark.parametrize("flag", ["--tls-cert", "--tls-key"])
def test_half_a_client_certificate_is_refused_not_an_abort(
    flag: str, target: str, tmp_path: Path
) -> None:
    # Without the check gRPC's C core aborts the process (SIGABRT), so run it apart.
    pem = _issue("test client", None, ca=False)
    path = tmp_path / "half.pem"
    path.write_bytes(pem.cert if flag == "--tls-cert" else pem.key)
    argv = ["query", "--target", target, flag, str(path), "graphs", "list"]
    done = subprocess.run(
        [sys.executable, "-m", "service", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, CIRCUITSCOPE_TOKEN=TOKEN, PYTHONPATH=str(REPO)),
    )
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert "\n" not in err and "--tls-cert and --tls-key go together" in err


def test_client_tls_needs_certificate_and_key_together() -> None:
    pem = _issue("test client", None, ca=False)
    with pytest.raises(InvalidArgumentError, match="go together"):
        ClientTls(client_cert=pem.cert)
    with pytest.raises(InvalidArgumentError, match="go together"):
        ClientTls(client_key=pem.key)
    ClientTls(client_cert=pem.cert, client_key=pem.key)  # both: fine


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--timeout", "inf", "health"], ["--timeout must be > 0 seconds and finite"]),
        (["--timeout", "nan", "health"], ["--timeout must be"]),
        (["--server-name", "example.org", "health"], ["--server-name only applies to TLS"]),
        (["health", "nosuchservice"], ["no health status for service 'nosuchservice'"]),
    ],
)
def test_connection_flag_mistakes_are_one_line(
    argv: list[str],
    needles: list[str],
    target: str,
    token_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["query", "--target", target, *argv]) == 2
    err = _one_line_error(capsys, *needles)
    assert "StatusCode" not in err and "DEADLINE_EXCEEDED" not in err


def test_a_target_port_out_of_range_is_refused(
    token_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["query", "--target", "127.0.0.1:99999", "health"]) == 2
    _one_line_error(capsys, "port must lie in 1..65535", "99999")


def test_a_token_file_that_is_a_directory_is_named_as_such(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["query", "--target", target, "--token-file", str(tmp_path), "health"]) == 2
    _one_line_error(capsys, "is a directory", str(tmp_path))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["graphs", "list", "--page-size", "99999999999"], "must lie in 1..2147483647"),
        (["graphs", "subgraph", "g-alpha", "E_100_0", "--depth", "4294967297"], "must lie in 1.."),
        (["graphs", "paths", "g-alpha", "E_100_0", "3_500_1", "--max-length", "-1"], "lie in 1.."),
        (["features", "get", "test-set", "0", str(2**63)], "must lie in 0..9223372036854775807"),
        (["features", "search", "test-set", "--layer", str(2**31)], "must lie in 0..2147483647"),
        (["attribute", "m", "p", "--node-threshold", "nan"], "must be a finite number"),
        (["evaluate", "m", "p", "q", "1", "2", "--fractions", "0.5", "inf"], "finite number"),
        # 0 is the API's "default": typed out, it is refused, not silently replaced
        (["graphs", "subgraph", "g-alpha", "E_100_0", "--depth", "0"], "--depth: must lie in 1"),
        (["graphs", "subgraph", "g-alpha", "E_100_0", "--top-k", "0"], "--top-k: must lie in 1"),
        (["graphs", "paths", "g-alpha", "a", "b", "--max-length", "0"], "--max-length: must lie"),
        (["jobs", "list", "--page-size", "0"], "--page-size: must lie in 1"),
        (["attribute", "m", "p", "--max-feature-nodes", "0"], "--max-feature-nodes: must lie"),
        (["intervene", "m", "p", "--top-k", "0"], "--top-k: must lie in 1"),
    ],
)
def test_numbers_outside_their_field_are_usage_errors(
    argv: list[str],
    needle: str,
    target: str,
    token_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["query", "--target", target, *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and needle in err, err


def test_logit_diff_tokens_are_ids_written_id_n(
    target: str, token_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # a bare "99" is the token text "99" for `circuitscope attribute`: refused here
    with pytest.raises(SystemExit) as exit_info:
        main(["query", "--target", target, "attribute", "m", "p", "--logit-diff", "99", "id:3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --logit-diff: give a token id as id:N, got '99'" in err


def test_the_client_turns_unrepresentable_values_into_invalid_argument(
    client: CircuitsClient,
) -> None:
    with pytest.raises(InvalidArgumentError, match="ListGraphs"):
        client.list_graphs(page_size=99_999_999_999)
    with pytest.raises(InvalidArgumentError, match="GetSubgraph"):
        client.get_subgraph("g-alpha", "E_100_0", depth=2**32 + 1)
    with pytest.raises(InvalidArgumentError, match="GetFeature"):
        client.get_feature("test-set", 0, 2**64)
    with pytest.raises(InvalidArgumentError, match="Intervene"):
        client.intervene("m", "p", [(2**31, 0, 0, "value", 1.0)])
    assert client.list_graphs(page_size=1).items  # the client still works


@pytest.mark.parametrize("flag", ["--set", "--scale"])
@pytest.mark.parametrize("number", ["nan", "inf", "Infinity"])
def test_intervene_refuses_non_finite_numbers(
    flag: str,
    number: str,
    analysis_target: str,
    token_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["query", "--target", analysis_target, "intervene", "tiny-gpt2", PROMPT]
    assert main([*argv, flag, "1", "2", "3", number, "--top-k", "1"]) == 2
    _one_line_error(capsys, flag, "finite")


def test_intervene_output_is_strict_json(
    analysis_target: str, token_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["query", "--target", analysis_target, "intervene", "tiny-gpt2", PROMPT]
    # A finite but huge activation drives the logits past float range: the answer
    # holds NaN and infinities, which strict JSON writes as null.
    assert main([*argv, "--set", "0", "0", "3", "3e38", "--top-k", "2"]) == 0  # index 0, pos 3
    out = _strict_json(capsys.readouterr().out)
    assert isinstance(out, dict)
    values = [t[key] for t in out["intervened"] for key in ("logit", "probability")]
    assert None in values


def test_emit_writes_non_finite_numbers_as_null(capsys: pytest.CaptureFixture[str]) -> None:
    query_cli._emit({"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": "x"})
    assert _strict_json(capsys.readouterr().out) == {"a": None, "b": [None, None, 1.5], "c": "x"}


def test_a_token_file_is_read_as_the_server_reads_its_tokens_file(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Comments and blank lines around the one token are skipped (the server's tokens-file
    format); a file of several tokens is refused, since the client sends one."""
    one = tmp_path / "token"
    one.write_text(f"# the demo's token\n\n{TOKEN}  # for graphs\n")
    assert main(["query", "--target", target, "--token-file", str(one), "graphs", "list"]) == 0
    assert "items" in _strict_json(capsys.readouterr().out)  # type: ignore[operator]
    two = tmp_path / "tokens"
    two.write_text(f"{TOKEN}\n{TOKEN}x\n")
    assert main(["query", "--target", target, "--token-file", str(two), "graphs", "list"]) == 2
    _one_line_error(capsys, "holds 2 tokens", str(two))


def test_a_local_model_directory_filters_by_the_id_ingest_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ingest stores a local model under its absolute path (load_model's model_id)
    (tmp_path / "zoo" / "greater_than-gpt2").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    stored = str((tmp_path / "zoo" / "greater_than-gpt2").resolve())
    assert model_id("zoo/greater_than-gpt2") == stored
    assert model_id("./zoo/../zoo/greater_than-gpt2") == stored
    # a hub id, or a path of the machine that ingested, is sent as written
    assert model_id("gpt2") == "gpt2"
    assert model_id("/elsewhere/model") == "/elsewhere/model"
    assert model_id("") == ""
    # what `query graphs list --model` sends
    args = build_parser().parse_args(
        ["query", "graphs", "list", "--model", "./zoo/greater_than-gpt2"]
    )
    assert args.model == stored
