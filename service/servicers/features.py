"""``circuits.v1.FeatureService`` over the store's feature catalog.

Translates each request into one store call (off the event loop, with the call's
deadline as the store timeout) and back. Labels are limited to
:data:`MAX_LABEL_CHARS` characters.
"""

from __future__ import annotations

from grpc import aio

from ingest.errors import InvalidArgumentError
from ingest.store.base import GraphStore
from service import convert
from service._generated.circuits.v1 import feature_service_pb2 as pb
from service._generated.circuits.v1 import feature_service_pb2_grpc
from service.pagination import decode_store_cursor, encode_page_token, page_size
from service.runner import BlockingRunner

MAX_LABEL_CHARS = 1000


class FeatureServicer(feature_service_pb2_grpc.FeatureServiceServicer):
    """Lookup, search and labelling of transcoder features."""

    def __init__(self, store: GraphStore, runner: BlockingRunner) -> None:
        self._store = store
        self._run = runner

    async def GetFeature(
        self, request: pb.GetFeatureRequest, context: aio.ServicerContext
    ) -> pb.GetFeatureResponse:
        set_id, layer, index = convert.feature_key_from_proto(request.key)
        feature = await self._run.call(context, self._store.get_feature, set_id, layer, index)
        return pb.GetFeatureResponse(feature=convert.feature_to_proto(feature))

    async def SearchFeatures(
        self, request: pb.SearchFeaturesRequest, context: aio.ServicerContext
    ) -> pb.SearchFeaturesResponse:
        if not request.set_id:
            raise InvalidArgumentError(
                "set_id is required: features are searched within one transcoder set"
            )
        layer = request.layer if request.HasField("layer") else None
        if layer is not None and layer < 0:
            raise InvalidArgumentError(f"layer must be >= 0, got {layer}")
        filters = {
            "set_id": request.set_id,
            "layer": layer,
            "label_contains": request.label_contains or None,
            "token": request.token or None,
        }
        cursor = decode_store_cursor(request.page_token, filters)
        page = await self._run.call(
            context,
            self._store.search_features,
            request.set_id,
            layer=layer,
            label_contains=filters["label_contains"],
            token=filters["token"],
            limit=page_size(request.page_size),
            cursor=cursor,
        )
        return pb.SearchFeaturesResponse(
            features=[convert.feature_to_proto(f) for f in page.items],
            next_page_token=encode_page_token(page.next_cursor, filters),
        )

    async def SetFeatureLabel(
        self, request: pb.SetFeatureLabelRequest, context: aio.ServicerContext
    ) -> pb.SetFeatureLabelResponse:
        set_id, layer, index = convert.feature_key_from_proto(request.key)
        if len(request.label) > MAX_LABEL_CHARS:
            raise InvalidArgumentError(
                f"label has {len(request.label)} characters; the limit is {MAX_LABEL_CHARS}"
            )
        feature = await self._run.call(
            context, self._store.set_feature_label, set_id, layer, index, request.label or None
        )
        return pb.SetFeatureLabelResponse(feature=convert.feature_to_proto(feature))

    async def ListFeatureOccurrences(
        self, request: pb.ListFeatureOccurrencesRequest, context: aio.ServicerContext
    ) -> pb.ListFeatureOccurrencesResponse:
        set_id, layer, index = convert.feature_key_from_proto(request.key)
        filters = {"set_id": set_id, "layer": layer, "index": index}
        cursor = decode_store_cursor(request.page_token, filters)
        page = await self._run.call(
            context,
            self._store.graphs_with_feature,
            set_id,
            layer,
            index,
            limit=page_size(request.page_size),
            cursor=cursor,
        )
        return pb.ListFeatureOccurrencesResponse(
            occurrences=[convert.occurrence_to_proto(o) for o in page.items],
            next_page_token=encode_page_token(page.next_cursor, filters),
        )
