"""FeatureService end to end: a real gRPC server over the real embedded store."""

from __future__ import annotations

import pytest

from ingest.errors import InvalidArgumentError, NotFoundError
from service.client import CircuitsClient
from tests.service import builders

pytestmark = pytest.mark.integration
SET = builders.SET_ID


def test_get_feature_round_trips_the_catalog_entry(client: CircuitsClient) -> None:
    expected = next(f for f in builders.features(3, 4) if (f.layer, f.index) == (1, 2))
    assert client.get_feature(SET, 1, 2) == expected


def test_search_features_filters_and_pages(client: CircuitsClient) -> None:
    layer1 = client.search_features(SET, layer=1, page_size=100).items
    assert [(f.layer, f.index) for f in layer1] == [(1, i) for i in range(4)]
    by_token = client.search_features(SET, token="tok3", page_size=100).items
    assert {(f.layer, f.index) for f in by_token} == {(layer, 3) for layer in range(3)}
    collected, token = [], ""
    while True:
        page = client.search_features(SET, page_size=5, page_token=token)
        collected.extend((f.layer, f.index) for f in page.items)
        if page.next_cursor is None:
            break
        token = page.next_cursor
    assert collected == sorted((f.layer, f.index) for f in builders.features(3, 4))


def test_set_feature_label_is_visible_to_reads_and_search(client: CircuitsClient) -> None:
    updated = client.set_feature_label(SET, 2, 1, "induction head helper")
    assert updated.label == "induction head helper"
    assert client.get_feature(SET, 2, 1).label == "induction head helper"
    found = client.search_features(SET, label_contains="induction").items
    assert [(f.layer, f.index) for f in found] == [(2, 1)]
    assert client.set_feature_label(SET, 2, 1, "").label is None


def test_feature_occurrences_list_graphs_where_it_is_active(client: CircuitsClient) -> None:
    # Feature (layer 0, index 3) exists only in g-delta (width 4).
    occurrences = client.feature_occurrences(SET, 0, 3).items
    assert [(o.graph_id, o.node_id) for o in occurrences] == [("g-delta", "0_3_1")]
    assert occurrences[0].activation == pytest.approx(4.0)
    graphs = {o.graph_id for o in client.feature_occurrences(SET, 0, 0, page_size=1000).items}
    assert graphs >= {"g-alpha", "g-beta", "g-delta", "g-epsilon"}


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: c.get_feature(SET, 0, 999), NotFoundError),
        (lambda c: c.get_feature("no-such-set", 0, 0), NotFoundError),
        (lambda c: c.get_feature("", 0, 0), InvalidArgumentError),
        (lambda c: c.get_feature(SET, -1, 0), InvalidArgumentError),
        (lambda c: c.search_features(""), InvalidArgumentError),
        (lambda c: c.search_features(SET, layer=-2), InvalidArgumentError),
        (lambda c: c.search_features(SET, page_token="%%%"), InvalidArgumentError),
        (lambda c: c.set_feature_label(SET, 0, 0, "x" * 1001), InvalidArgumentError),
        (lambda c: c.set_feature_label("no-such-set", 0, 0, "x"), NotFoundError),
        (lambda c: c.feature_occurrences(SET, 0, 0, page_size=-3), InvalidArgumentError),
    ],
)
def test_bad_feature_requests_get_their_status(client: CircuitsClient, call, error) -> None:
    with pytest.raises(error):
        call(client)
