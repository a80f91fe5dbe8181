"""Where circuitscope keeps its data on disk when the user does not say.

``CIRCUITSCOPE_HOME`` overrides the default ``~/.cache/circuitscope``.
"""

import os
import tempfile
from pathlib import Path
from typing import Any

from ingest.errors import InvalidArgumentError


def home() -> Path:
    """The root directory for trained models, transcoders, artifacts and the embedded store."""
    root = os.environ.get("CIRCUITSCOPE_HOME")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "circuitscope"


def model_id(name_or_path: str) -> str:
    """The id a checkpoint's graphs and transcoder sets are stored under: a directory that
    exists here is its absolute path (``./zoo/x``, ``zoo/x/`` and ``~/zoo/x`` are one
    model); anything else, a hub id or a path on another machine, is kept as written."""
    try:
        path = Path(name_or_path).expanduser()
    except RuntimeError:  # ~name of an unknown user: not a directory here
        return name_or_path
    return str(path.resolve()) if name_or_path and path.is_dir() else name_or_path


def check_output(path: Path, flag: str, *, directory: bool) -> None:
    """Fail before any work when ``path`` cannot be written as a file (or, with
    ``directory``, as a directory) with an :class:`~ingest.errors.InvalidArgumentError`
    that names ``flag``.

    Refused: a parent that is a file, a file where a directory is wanted (or the
    reverse), a broken symbolic link, a directory this process may not write into, and,
    for a file, a parent directory it may not write (files are written to a temporary
    name beside them, then renamed). Missing parents are fine: the writers create them.
    """
    want = "a directory" if directory else "a file path"
    if path.is_symlink() and not path.exists():
        raise InvalidArgumentError(
            f"{flag} {path} is a broken symbolic link: remove it or choose another {flag}"
        )
    if path.exists():
        if path.is_dir() != directory:
            kind = "a directory" if path.is_dir() else "a file"
            raise InvalidArgumentError(f"{flag} {path} is {kind}: give {want}")
        if directory and not _writable_dir(path):
            raise InvalidArgumentError(f"{flag} {path} is not writable: choose another {flag}")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InvalidArgumentError(
            f"{flag} {path}: {parent} is a file, not a directory; choose another {flag}"
        )
    if not (directory and path.exists()) and not _writable_dir(parent):
        raise InvalidArgumentError(
            f"{flag} {path}: cannot write in {parent} (not writable); choose another {flag}"
        )


def _writable_dir(path: Path) -> bool:
    """Whether a file can be created in ``path``, found by creating (and at once
    removing) one: permission bits do not tell, for root, that /proc or a read-only
    mount refuses it."""
    if not os.access(path, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def process_umask() -> int:
    """This process's file-creation mask, read without changing it where Linux reports it
    (``os.umask`` can only be read by setting it, which races with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_tensors(
    tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file``, with the file given the permissions any file this
    process creates gets (safetensors creates it 0600, readable by its writer only)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~process_umask())
