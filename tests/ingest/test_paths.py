"""Output paths are checked before any work, with errors that name the flag."""

import os
import stat
from pathlib import Path

import pytest
import torch

from ingest.errors import InvalidArgumentError
from ingest.paths import check_output, process_umask, save_tensors

pytestmark = pytest.mark.unit


def test_writable_paths_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    check_output(tmp_path / "new" / "deeper" / "out.json", "--json", directory=False)
    check_output(tmp_path / "new-dir", "--out", directory=True)
    (tmp_path / "existing").mkdir()
    check_output(tmp_path / "existing", "--out", directory=True)
    (tmp_path / "report.json").write_text("{}")
    check_output(tmp_path / "report.json", "--json", directory=False)
    check_output(Path("relative") / "out", "--out", directory=True)
    check_output(Path("."), "--out", directory=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "report.json"]


@pytest.mark.parametrize(
    ("name", "directory", "message"),
    [
        ("afile/inside", True, "afile is a file, not a directory"),
        ("afile/x/y.json", False, "afile is a file, not a directory"),
        ("afile", True, "is a file: give a directory"),
        ("adir", False, "is a directory: give a file path"),
        ("dangling", True, "broken symbolic link"),
    ],
)
def test_unusable_paths_name_the_flag_and_problem(
    tmp_path: Path, name: str, directory: bool, message: str
) -> None:
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(InvalidArgumentError, match=message) as info:
        check_output(tmp_path / name, "--flag", directory=directory)
    assert str(info.value).startswith("--flag ")


def test_read_only_directories_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The suite runs as root in CI, where chmod does not stop writes: the permission
    # answer for one directory is set through os.access instead.
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "old.json").write_text("{}")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    with pytest.raises(InvalidArgumentError, match="not writable"):
        check_output(locked / "new.json", "--json", directory=False)
    with pytest.raises(InvalidArgumentError, match="not writable"):
        check_output(locked / "old.json", "--json", directory=False)
    with pytest.raises(InvalidArgumentError, match="not writable"):
        check_output(locked, "--out", directory=True)
    check_output(tmp_path / "free.json", "--json", directory=False)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_directories_that_refuse_new_files_are_refused_whatever_the_permission_bits() -> None:
    # /proc's permission bits let root write; creating a file there still fails
    with pytest.raises(InvalidArgumentError, match="cannot write in /proc"):
        check_output(Path("/proc/circuitscope-report.json"), "--json", directory=False)
    with pytest.raises(InvalidArgumentError, match="not writable"):
        check_output(Path("/proc"), "--out", directory=True)


def test_saved_tensors_take_the_process_umask(tmp_path) -> None:
    before = os.umask(0o027)
    try:
        assert process_umask() == 0o027
        save_tensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o640
