"""AIP-158 pagination: page sizes and opaque page tokens over keyset cursors.

The store pages by keyset (the last row's sort key, never ``SKIP``); the service wraps
the store's cursor in an opaque token bound to the request's filters:
``base64url(JSON {"v": 1, "f": sha256(filters)[:16], "c": cursor})``. A token that
does not decode, has another version, or was issued for different filters is
INVALID_ARGUMENT. The token is not a secret or a signature: it only carries where the
previous page ended, and the store re-checks every filter on each page. Since anyone
can make a token with the right digest, its cursor is checked before use: a store
cursor (:func:`decode_store_cursor`) must be a string of at most
:data:`MAX_CURSOR_CHARS` characters, else INVALID_ARGUMENT as well.

Page sizes: 0 means :data:`DEFAULT_PAGE_SIZE`, negative is INVALID_ARGUMENT, above
:data:`MAX_PAGE_SIZE` is clamped to it (AIP-158 allows coercing).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from ingest.errors import InvalidArgumentError

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_VERSION = 1
_MAX_TOKEN_CHARS = 4096
#: The longest store cursor a token may carry. The store's are a graph id, a creation
#: time and a graph id, or a layer and an index: far shorter.
MAX_CURSOR_CHARS = 1024


def page_size(
    requested: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE
) -> int:
    """The effective page size for a requested one (see module doc)."""
    if requested < 0:
        raise InvalidArgumentError(
            f"page_size must be >= 0 (0 for the default {default}), got {requested}"
        )
    if requested == 0:
        return default
    return min(requested, maximum)


def _digest(filters: dict[str, Any]) -> str:
    canonical = json.dumps(filters, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode_page_token(cursor: Any, filters: dict[str, Any]) -> str:
    """The opaque token of the page after ``cursor``; empty when ``cursor`` is None."""
    if cursor is None:
        return ""
    payload = json.dumps({"v": _VERSION, "f": _digest(filters), "c": cursor}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def _bad_token() -> InvalidArgumentError:
    return InvalidArgumentError(
        "page_token is malformed or was issued for other filters; pass the "
        "next_page_token of the previous response unchanged, with the same filters, "
        "or no page_token for the first page"
    )


def decode_page_token(token: str, filters: dict[str, Any]) -> Any:
    """The cursor in ``token`` as it was encoded, any JSON value, unchecked; None for an
    empty token (the first page). The caller checks its shape (ListJobs' keyset);
    store cursors are read with :func:`decode_store_cursor`."""
    if not token:
        return None
    bad = _bad_token()
    if len(token) > _MAX_TOKEN_CHARS:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw.decode())
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad from None
    if (
        not isinstance(payload, dict)
        or payload.get("v") != _VERSION
        or payload.get("f") != _digest(filters)
        or "c" not in payload
    ):
        raise bad
    return payload["c"]


def decode_store_cursor(token: str, filters: dict[str, Any]) -> str | None:
    """The store's keyset cursor in ``token``; None for an empty token (the first page).
    INVALID_ARGUMENT, as for any bad token, unless the cursor is a non-empty string of
    at most :data:`MAX_CURSOR_CHARS` characters (what the store hands out)."""
    cursor = decode_page_token(token, filters)
    if cursor is None:
        return None
    if not isinstance(cursor, str) or not 0 < len(cursor) <= MAX_CURSOR_CHARS:
        raise _bad_token()
    return cursor
