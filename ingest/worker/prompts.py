"""Reading the ingest worker's prompt file.

The file is JSON Lines, one prompt per line::

    {"prompt": "The war lasted from the year 1732 to the year 17",
     "counterfactual": "The war lasted from the year 1701 to the year 17",
     "task": "greater_than", "id": "gt-0001"}

Only ``prompt`` is required. ``counterfactual`` (a prompt whose answer differs),
``task`` (a task label stored on the graph), ``id`` (the caller's own name for the
prompt) and ``correct``/``incorrect`` (tokens whose logit difference becomes the
attribution target) are optional. Blank lines and lines starting with ``#`` are
ignored. A line that does not parse or lacks a usable ``prompt`` is a
:class:`BadLine`, reported with its line number; reading goes on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ingest.errors import InvalidArgumentError, NotFoundError

_KNOWN_FIELDS = frozenset({"prompt", "counterfactual", "task", "id", "correct", "incorrect"})


@dataclass(frozen=True)
class PromptSpec:
    """One prompt to ingest, with its line number in the file (1-based)."""

    line: int
    prompt: str
    counterfactual: str | None = None
    task: str | None = None
    prompt_id: str | None = None
    correct: str | None = None
    incorrect: str | None = None

    def record(self) -> dict[str, str]:
        """The JSON Lines record this was parsed from, unset fields left out."""
        fields = {
            "prompt": self.prompt,
            "counterfactual": self.counterfactual,
            "task": self.task,
            "id": self.prompt_id,
            "correct": self.correct,
            "incorrect": self.incorrect,
        }
        return {key: value for key, value in fields.items() if value is not None}


@dataclass(frozen=True)
class BadLine:
    """A line that cannot be ingested, and why."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


def _optional_str(record: dict[str, object], key: str) -> str | None:
    value = record.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def parse_line(line_no: int, text: str) -> PromptSpec | BadLine | None:
    """Parse one line; None for blank and comment lines."""
    stripped = text.strip()
    if not stripped or stripped.startswith("#"):
        return None
    try:
        record = json.loads(stripped)
    except json.JSONDecodeError as exc:
        return BadLine(line_no, f"not valid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(record, dict):
        return BadLine(line_no, "expected a JSON object with a 'prompt' field")
    prompt = record.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        kind = type(prompt).__name__
        return BadLine(line_no, f"'prompt' must be a string, got a JSON {kind}: quote it")
    if not isinstance(prompt, str) or not prompt.strip():
        return BadLine(line_no, "missing or empty 'prompt' (a non-empty string is required)")
    unknown = sorted(set(record) - _KNOWN_FIELDS)
    if unknown:
        return BadLine(line_no, f"unknown field(s) {unknown}: allowed are {sorted(_KNOWN_FIELDS)}")
    try:
        spec = PromptSpec(
            line=line_no,
            prompt=prompt,
            counterfactual=_optional_str(record, "counterfactual"),
            task=_optional_str(record, "task"),
            prompt_id=_optional_str(record, "id"),
            correct=_optional_str(record, "correct"),
            incorrect=_optional_str(record, "incorrect"),
        )
    except ValueError as exc:
        return BadLine(line_no, str(exc))
    if (spec.correct is None) != (spec.incorrect is None):
        return BadLine(line_no, "'correct' and 'incorrect' must be given together")
    return spec


def check_prompt_file(path: Path) -> None:
    """Raise unless ``path`` is a file (before any work that would read it)."""
    if path.is_dir():
        raise InvalidArgumentError(f"prompt file {str(path)!r} is a directory: pass a JSONL file")
    if not path.is_file():
        raise NotFoundError(f"prompt file {str(path)!r} does not exist: pass a JSONL file")


def read_prompts(path: Path, first_line: int = 1) -> Iterator[PromptSpec | BadLine]:
    """Stream the prompt file line by line (memory does not grow with the file).
    ``first_line`` numbers the file's first line (a part of a longer list of prompts)."""
    check_prompt_file(path)
    with path.open(encoding="utf-8") as handle:
        try:
            for line_no, text in enumerate(handle, start=first_line):
                parsed = parse_line(line_no, text)
                if parsed is not None:
                    yield parsed
        except UnicodeDecodeError as exc:
            raise InvalidArgumentError(
                f"prompt file {str(path)!r} is not UTF-8 text ({exc.reason}): "
                "save it as UTF-8 JSON Lines"
            ) from exc
