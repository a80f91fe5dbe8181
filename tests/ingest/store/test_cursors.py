"""Page cursors: the store takes back what it handed out and refuses what it did not."""

from __future__ import annotations

import pytest

from ingest.errors import InvalidArgumentError
from ingest.store import cursors

pytestmark = pytest.mark.unit

LISTINGS = (cursors.GRAPHS_BY_ID, cursors.GRAPHS_NEWEST, cursors.FEATURE_OCCURRENCES)


@pytest.mark.parametrize("key", ["g-alpha", "it's # a:graph#id", "1764072000000:g#1"])
def test_handed_out_cursors_read_back_vouched(key: str) -> None:
    for listing in LISTINGS:
        assert cursors.read(listing, cursors.make(listing, key)) == (key, True)
    assert cursors.read(cursors.GRAPHS_BY_ID, None) is None


def test_other_strings_are_bare_keys_for_the_store_to_check_or_refused() -> None:
    made = cursors.make(cursors.GRAPHS_BY_ID, "g-alpha")
    # another listing's cursor, an edited key, a made-up string: not vouched for
    assert cursors.read(cursors.FEATURE_OCCURRENCES, made) == (made, False)
    edited = made.replace("alpha", "beta")
    assert cursors.read(cursors.GRAPHS_BY_ID, edited) == (edited, False)
    assert cursors.read(cursors.GRAPHS_BY_ID, "abc") == ("abc", False)
    assert cursors.graph_key(cursors.GRAPHS_NEWEST, "17:g:x") == "g:x"
    # what cannot even be a bare key is refused at once, saying what to pass instead
    for listing, cursor in [
        (cursors.GRAPHS_BY_ID, ""),
        (cursors.GRAPHS_BY_ID, 12),
        (cursors.GRAPHS_NEWEST, made),
        (cursors.GRAPHS_NEWEST, f"{2**63}:g"),
    ]:
        with pytest.raises(InvalidArgumentError, match=r"not a page token.*next_cursor"):
            cursors.read(listing, cursor)


def test_catalog_cursors_are_two_int64() -> None:
    assert cursors.layer_and_index(cursors.make_catalog(3, 117)) == (3, 117)
    assert cursors.layer_and_index(None) is None
    for bad in ("3", "a:1", f"1:{2**63}", "", [1]):
        with pytest.raises(InvalidArgumentError, match="page token"):
            cursors.layer_and_index(bad)
