"""The committed stubs in service/_generated are exactly what proto/generate.py makes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("proto_generate", REPO / "proto" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.unit
def test_generated_stubs_are_current(tmp_path: Path) -> None:
    generator = _load_generator()
    fresh = tmp_path / "generated"
    generator.generate(fresh)
    committed = REPO / "service" / "_generated"
    fresh_files = {p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file()}
    committed_files = {
        p.relative_to(committed)
        for p in committed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert fresh_files == committed_files, "run `python3 proto/generate.py` and commit the result"
    stale = [
        str(rel)
        for rel in sorted(fresh_files)
        if (fresh / rel).read_text() != (committed / rel).read_text()
    ]
    assert not stale, f"stale generated files {stale}: run `python3 proto/generate.py` and commit"


@pytest.mark.unit
def test_generated_code_imports_through_the_package_path() -> None:
    from service._generated.circuits.v1 import graph_service_pb2, graph_service_pb2_grpc

    request = graph_service_pb2.ListGraphsRequest(page_size=3)
    assert graph_service_pb2.ListGraphsRequest.FromString(request.SerializeToString()) == request
    assert hasattr(graph_service_pb2_grpc, "GraphServiceStub")
    assert graph_service_pb2.DESCRIPTOR.package == "circuits.v1"
