"""Page tokens carry only cursors the store handed out: anything else in a token whose
filter digest is right (anyone can compute it) is INVALID_ARGUMENT, never passed on."""

from __future__ import annotations

import pytest

from ingest.errors import InvalidArgumentError
from service.pagination import MAX_CURSOR_CHARS, decode_store_cursor, encode_page_token

pytestmark = pytest.mark.unit

FILTERS = {"model_id": None, "task": "ioi", "prompt_contains": None, "newest_first": True}


def test_store_cursors_round_trip() -> None:
    for cursor in ("g-alpha", "1764072000000:g-alpha", "3:117", "x" * MAX_CURSOR_CHARS):
        assert decode_store_cursor(encode_page_token(cursor, FILTERS), FILTERS) == cursor
    assert decode_store_cursor("", FILTERS) is None


@pytest.mark.parametrize(
    "cursor", [5, 1.5, True, [1], ["a", "b"], {"a": 1}, "", "x" * (MAX_CURSOR_CHARS + 1)]
)
def test_forged_cursors_are_invalid_arguments(cursor: object) -> None:
    token = encode_page_token(cursor, FILTERS)
    with pytest.raises(InvalidArgumentError, match=r"unchanged.*first page"):
        decode_store_cursor(token, FILTERS)
