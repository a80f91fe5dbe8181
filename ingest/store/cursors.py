"""Keyset cursors of the store's listings: made here, and checked when they come back.

A cursor is the sort key of the last item of a page, and the next page starts after
it. The keys are graph ids (graphs by id, feature occurrences), a creation time and a
graph id (graphs newest first), or a layer and an index (catalog search).

A graph id can be any string, so a key alone cannot tell a cursor the store handed out
from a string made up by hand (``"abc"`` would silently list the graphs after it). A
graph-id cursor therefore carries a tag: ``KEY#TAG``, ``TAG`` the first 12 hex digits
of ``sha256(LISTING \\0 KEY)``. The tag is a check, not a secret (positions in a listing
are not confidential, and every filter is applied again on each page): it catches
strings that were never cursors, and a cursor of one listing passed to another. A
tagged cursor keeps working when its graph is deleted meanwhile.

Cursors handed out before tags existed are the bare key; they are still taken when the
graph they name is stored (:func:`graph_key` says which graph to look up). Catalog
cursors, two integers, need no tag: every pair is a valid position.
"""

from __future__ import annotations

import hashlib
from typing import Final

from ingest.errors import InvalidArgumentError

#: the listings whose cursors end with a graph id
GRAPHS_BY_ID: Final = "graphs"
GRAPHS_NEWEST: Final = "graphs-newest"
FEATURE_OCCURRENCES: Final = "occurrences"

_SEPARATOR = "#"
_TAG_CHARS = 12
_INT64 = (-(2**63), 2**63 - 1)


def malformed(cursor: object) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{cursor!r:.100} is not a page token (cursor) this store handed out; pass the "
        "next page token (next_cursor) of the previous page unchanged, or none for the "
        "first page"
    )


def _tag(listing: str, key: str) -> str:
    return hashlib.sha256(f"{listing}\0{key}".encode()).hexdigest()[:_TAG_CHARS]


def make(listing: str, key: str) -> str:
    """The cursor of ``listing`` (one of the constants above) after ``key``."""
    return f"{key}{_SEPARATOR}{_tag(listing, key)}"


def check_type(cursor: object) -> str | None:
    """``cursor`` when it is None or a string; InvalidArgumentError otherwise."""
    if cursor is not None and not isinstance(cursor, str):
        raise malformed(cursor)
    return cursor


def read(listing: str, cursor: object) -> tuple[str, bool] | None:
    """The key in a graph-id ``cursor`` of ``listing`` and whether its tag vouches for
    it (False: a bare key, taken only if the caller finds its graph); None for the
    first page. InvalidArgumentError for anything else."""
    text = check_type(cursor)
    if text is None:
        return None
    key, sep, tag = text.rpartition(_SEPARATOR)
    if sep and tag == _tag(listing, key):
        return key, True
    if not text:
        raise malformed(cursor)
    if listing == GRAPHS_NEWEST:
        time_and_id(text)  # the shape of a bare newest-first key
    return text, False


def graph_key(listing: str, key: str) -> str:
    """The graph id a key of ``listing`` ends with."""
    return key.partition(":")[2] if listing == GRAPHS_NEWEST else key


def _int64(text: str, cursor: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise malformed(cursor) from None
    if not _INT64[0] <= value <= _INT64[1]:
        raise malformed(cursor)
    return value


def time_and_id(key: str) -> tuple[int, str]:
    """A ``created_at:graph_id`` key (graphs newest first) as its two parts;
    InvalidArgumentError on a malformed one."""
    head, sep, tail = key.partition(":")
    if not sep:
        raise malformed(key)
    return _int64(head, key), tail


def layer_and_index(cursor: object) -> tuple[int, int] | None:
    """A catalog cursor, ``layer:index``, as two ints; None for the first page and
    InvalidArgumentError on a malformed one."""
    text = check_type(cursor)
    if text is None:
        return None
    head, sep, tail = text.partition(":")
    if not sep:
        raise malformed(text)
    return _int64(head, text), _int64(tail, text)


def make_catalog(layer: int, index: int) -> str:
    """The catalog cursor after feature (layer, index)."""
    return f"{layer}:{index}"
