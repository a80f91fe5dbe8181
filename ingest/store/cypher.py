"""Every Cypher statement the store runs, as constants.

Values always travel as parameters; labels, relationship types and property names
are constants of this module, never built from user input. The one exception is the
upper bound of a variable-length pattern, which Cypher does not accept as a
parameter: :func:`paths_query` formats an int the caller validated into a range.

The statements keep to the Cypher that Neo4j 5 and ArcadeDB's OpenCypher engine both
run (docs/store.md lists what was checked and the divergences): no ``CALL {}``
subqueries, no ``IN TRANSACTIONS``, no APOC, per-node top-k through ``collect()[..k]``.

Graph model (DESIGN.md section 4):

- ``(:Graph {graph_id, status, write_id, model_id, set_id, task, prompt, tokens,
  token_ids, node_threshold, edge_threshold, replacement_score, completeness_score,
  artifact_uri, extra_json, n_nodes, n_edges, created_at, updated_at, batches})``, times in
  epoch ms;
- ``(:GNode {graph_id, node_id, idx, kind, layer, pos, feature, set_id, token_id, token,
  activation, influence, token_prob, label})``, ``idx`` the position in the graph's
  node list; feature nodes link to the catalog by (set_id, layer, feature), not by a
  relationship;
- ``(:GNode)-[:ATTR {weight, idx}]->(:GNode)``, ``idx`` the edge's position;
- ``(:Feature {set_id, layer, index, density, max_activation, label, top_tokens,
  top_examples_json, de_embedding_tokens, output_tokens})``;
- ``(:Model {model_id, ...})``, ``(:TranscoderSet {set_id, model_id, kind, ...})``.
"""

from __future__ import annotations

from typing import Final

# ------------------------------------------------------------------------------ schema

SCHEMA: Final[tuple[str, ...]] = (
    "CREATE CONSTRAINT graph_id_unique IF NOT EXISTS FOR (g:Graph) REQUIRE g.graph_id IS UNIQUE",
    "CREATE CONSTRAINT gnode_key_unique IF NOT EXISTS "
    "FOR (n:GNode) REQUIRE (n.graph_id, n.node_id) IS UNIQUE",
    "CREATE CONSTRAINT feature_key_unique IF NOT EXISTS "
    "FOR (f:Feature) REQUIRE (f.set_id, f.layer, f.index) IS UNIQUE",
    "CREATE CONSTRAINT model_id_unique IF NOT EXISTS FOR (m:Model) REQUIRE m.model_id IS UNIQUE",
    "CREATE CONSTRAINT transcoder_set_id_unique IF NOT EXISTS "
    "FOR (t:TranscoderSet) REQUIRE t.set_id IS UNIQUE",
    "CREATE INDEX gnode_graph IF NOT EXISTS FOR (n:GNode) ON (n.graph_id)",
    "CREATE INDEX gnode_position IF NOT EXISTS FOR (n:GNode) ON (n.graph_id, n.idx)",
    "CREATE INDEX gnode_feature IF NOT EXISTS FOR (n:GNode) ON (n.set_id, n.layer, n.feature)",
    "CREATE INDEX graph_model IF NOT EXISTS FOR (g:Graph) ON (g.model_id)",
    "CREATE INDEX graph_task IF NOT EXISTS FOR (g:Graph) ON (g.task)",
    "CREATE INDEX graph_created IF NOT EXISTS FOR (g:Graph) ON (g.created_at)",
    "CREATE INDEX feature_layer IF NOT EXISTS FOR (f:Feature) ON (f.set_id, f.layer)",
)

# ------------------------------------------------------------------------------ catalog

UPSERT_MODEL: Final = "MERGE (m:Model {model_id: $model_id}) SET m += $props"

UPSERT_TRANSCODER_SET: Final = "MERGE (t:TranscoderSet {set_id: $set_id}) SET t += $props"

UPSERT_FEATURES: Final = (
    "UNWIND $rows AS r "
    "MERGE (f:Feature {set_id: r.set_id, layer: r.layer, index: r.index}) "
    "SET f += r.props"
)

SET_FEATURE_LABEL: Final = (
    "MERGE (f:Feature {set_id: $set_id, layer: $layer, index: $index}) "
    "SET f.label = $label RETURN properties(f) AS p"
)

FEATURE_SET_SCOPE: Final = (
    "MATCH (t:TranscoderSet {set_id: $set_id}) "
    "OPTIONAL MATCH (m:Model {model_id: t.model_id}) "
    "RETURN t.d_transcoder AS width, m.n_layers AS n_layers"
)

GET_FEATURE: Final = (
    "MATCH (f:Feature {set_id: $set_id, layer: $layer, index: $index}) RETURN properties(f) AS p"
)

SEARCH_FEATURES: Final = (
    "MATCH (f:Feature {set_id: $set_id}) "
    "WHERE ($layer IS NULL OR f.layer = $layer) "
    "AND ($label IS NULL OR toLower(coalesce(f.label, '')) CONTAINS $label) "
    "AND ($token IS NULL OR $token IN coalesce(f.top_tokens, [])) "
    "AND (f.layer > $after_layer OR (f.layer = $after_layer AND f.index > $after_index)) "
    "RETURN properties(f) AS p ORDER BY f.layer, f.index LIMIT $limit"
)

# ------------------------------------------------------------------------------ graph writes

# Claims a graph id for one write, in one statement so that no other writer can store
# a complete graph between the check and the claim: no row comes back when the graph is
# complete and $replace is false. Readers stop seeing the graph from here on. The first
# claim's created_at is kept (a replaced graph keeps its place in newest-first listings);
# updated_at is the latest claim's.
CLAIM_GRAPH: Final = (
    "MERGE (g:Graph {graph_id: $graph_id}) "
    "WITH g, g.status AS old, g.created_at AS created "
    "WHERE old IS NULL OR old <> 'complete' OR $replace "
    "SET g = $props, g.created_at = coalesce(created, $now), g.updated_at = $now "
    "RETURN coalesce(old, '') AS old"
)

# Run first in every transaction that writes or deletes under a claim: takes the write
# lock on the :Graph node (on Neo4j a concurrent claim waits for this transaction; on
# ArcadeDB one of two concurrent changes fails and is retried), then reports whether
# the claim still holds. The caller rolls back when it does not.
HOLD_CLAIM: Final = (
    "MATCH (g:Graph {graph_id: $graph_id}) SET g.batches = coalesce(g.batches, 0) + 1 "
    "RETURN g.write_id = $write_id AS held"
)

DELETE_GNODES_BATCH: Final = (
    "MATCH (n:GNode {graph_id: $graph_id}) WITH n LIMIT $limit DETACH DELETE n RETURN count(*) AS n"
)

CREATE_GNODES: Final = "UNWIND $rows AS r CREATE (n:GNode) SET n = r RETURN count(n) AS n"

# Rows are grouped by source: {s, out: [{t, w, i}, ...]}; endpoints are found by
# (graph_id, idx), integer keys measured faster than node_id strings. An edge whose
# endpoints match nothing is not created: the caller compares the count.
CREATE_ATTR_EDGES: Final = (
    "UNWIND $rows AS r "
    "MATCH (a:GNode {graph_id: $graph_id, idx: r.s}) "
    "UNWIND r.out AS e "
    "MATCH (b:GNode {graph_id: $graph_id, idx: e.t}) "
    "CREATE (a)-[r2:ATTR {weight: e.w, idx: e.i}]->(b) RETURN count(r2) AS n"
)

COUNT_GNODES: Final = "MATCH (n:GNode {graph_id: $graph_id}) RETURN count(n) AS n"

COUNT_ATTR_EDGES: Final = "MATCH (a:GNode {graph_id: $graph_id})-[r:ATTR]->() RETURN count(r) AS n"

# Run after HOLD_CLAIM and the counts, in the same transaction.
COMPLETE_GRAPH: Final = (
    "MATCH (g:Graph {graph_id: $graph_id}) WHERE g.write_id = $write_id "
    "SET g.status = 'complete', g.n_nodes = $n_nodes, g.n_edges = $n_edges "
    "RETURN count(g) AS updated"
)

# Creates a placeholder when there is no :Graph node, so that nodes left without one
# can be deleted under a claim too; `old` is null then.
MARK_DELETING: Final = (
    "MERGE (g:Graph {graph_id: $graph_id}) WITH g, g.status AS old "
    "SET g.status = 'deleting', g.write_id = $write_id RETURN old"
)

DELETE_GRAPH_NODE: Final = (
    "MATCH (g:Graph {graph_id: $graph_id}) WHERE g.write_id = $write_id DELETE g"
)

# ------------------------------------------------------------------------------ graph reads

GRAPH_SUMMARY: Final = (
    "MATCH (g:Graph {graph_id: $graph_id}) WHERE g.status = 'complete' RETURN properties(g) AS p"
)

# Whether a :Graph node (of any status) has this id: checks an untagged page cursor.
GRAPH_KNOWN: Final = "MATCH (g:Graph {graph_id: $graph_id}) RETURN g.graph_id AS graph_id"

# The write id of each complete graph among $graph_ids: a fresh id is set whenever a
# graph is claimed for writing or marked for deletion, so it is the graph's revision.
GRAPH_REVISIONS: Final = (
    "UNWIND $graph_ids AS gid MATCH (g:Graph {graph_id: gid}) WHERE g.status = 'complete' "
    "RETURN g.graph_id AS graph_id, g.write_id AS write_id, g.n_nodes AS n_nodes, "
    "g.n_edges AS n_edges"
)

# The properties of a :GNode, in the order GRAPH_NODES packs them.
NODE_COLUMNS: Final = (
    "idx",
    "node_id",
    "kind",
    "layer",
    "pos",
    "feature",
    "token_id",
    "token",
    "activation",
    "influence",
    "token_prob",
    "label",
)

# One row holding a list per node: on ArcadeDB 2x faster than properties(n) per record.
GRAPH_NODES: Final = (
    "MATCH (n:GNode {graph_id: $graph_id}) RETURN collect(["
    + ", ".join(f"n.{c}" for c in NODE_COLUMNS)
    + "]) AS nodes"
)

# One row of parallel lists (aggregations consume the same rows in the same order):
# a few times faster than one record per edge, and sorting by idx is left to numpy.
GRAPH_EDGES: Final = (
    "MATCH (a:GNode {graph_id: $graph_id})-[r:ATTR]->(b:GNode) "
    "RETURN collect(a.idx) AS s, collect(b.idx) AS t, collect(r.weight) AS w, "
    "collect(r.idx) AS i"
)

# Lookups by node id go through UNWIND: ArcadeDB's cost-based planner serves a plain
# MATCH on (graph_id, node_id) with a graph_id-prefix index plus a filter (a scan of
# the graph's nodes, ~80 ms at 10k nodes), while the UNWIND form seeks the unique
# (graph_id, node_id) index (~2 ms). Neo4j plans both the same way.
NODES_BY_ID: Final = (
    "UNWIND $node_ids AS nid MATCH (n:GNode {graph_id: $graph_id, node_id: nid}) "
    "RETURN properties(n) AS p ORDER BY n.idx"
)

# Per frontier node, its top-k edges by |weight|; ties by the other end's id.
TOP_OUT_EDGES: Final = (
    "UNWIND $frontier AS fid "
    "MATCH (a:GNode {graph_id: $graph_id, node_id: fid})-[r:ATTR]->(b:GNode) "
    "WITH a, b, r ORDER BY abs(r.weight) DESC, b.node_id "
    "WITH a, collect({s: a.node_id, t: b.node_id, w: r.weight})[..$k] AS top "
    "UNWIND top AS e RETURN e.s AS s, e.t AS t, e.w AS w"
)

TOP_IN_EDGES: Final = (
    "UNWIND $frontier AS fid "
    "MATCH (b:GNode {graph_id: $graph_id, node_id: fid})<-[r:ATTR]-(a:GNode) "
    "WITH a, b, r ORDER BY abs(r.weight) DESC, a.node_id "
    "WITH b, collect({s: a.node_id, t: b.node_id, w: r.weight})[..$k] AS top "
    "UNWIND top AS e RETURN e.s AS s, e.t AS t, e.w AS w"
)

_PATHS_TEMPLATE: Final = (
    "UNWIND [[$source_id, $target_id]] AS ends "
    "MATCH (a:GNode {{graph_id: $graph_id, node_id: ends[0]}}) "
    "MATCH (b:GNode {{graph_id: $graph_id, node_id: ends[1]}}) "
    "MATCH p = (a)-[:ATTR*1..{max_length}]->(b) "
    "WITH p, reduce(acc = {init}, r IN relationships(p) | acc {op} abs(r.weight)) AS score "
    "RETURN [n IN nodes(p) | n.node_id] AS ids, [r IN relationships(p) | r.weight] AS ws, score "
    "ORDER BY score DESC LIMIT $k"
)

MAX_PATH_LENGTH: Final = 10


def paths_query(max_length: int, score: str) -> str:
    """The strongest-paths query for a validated bound and a score of the code's choosing."""
    if not (isinstance(max_length, int) and 1 <= max_length <= MAX_PATH_LENGTH):
        raise ValueError(f"max_length must be an int in [1, {MAX_PATH_LENGTH}]")
    init, op = {"product": ("1.0", "*"), "sum": ("0.0", "+")}[score]
    return _PATHS_TEMPLATE.format(max_length=max_length, init=init, op=op)


FEATURE_OCCURRENCES: Final = (
    "MATCH (n:GNode {set_id: $set_id, layer: $layer, feature: $index}) "
    "WHERE n.graph_id > $after "
    "MATCH (g:Graph {graph_id: n.graph_id}) WHERE g.status = 'complete' "
    "WITH n.graph_id AS graph_id, collect({node_id: n.node_id, pos: n.pos, "
    "activation: n.activation, influence: n.influence}) AS occ "
    "RETURN graph_id, occ ORDER BY graph_id LIMIT $limit"
)

_LIST_GRAPHS_FILTER: Final = (
    "MATCH (g:Graph) WHERE g.status = 'complete' "
    "AND ($model_id IS NULL OR g.model_id = $model_id) "
    "AND ($task IS NULL OR g.task = $task) "
    "AND ($prompt IS NULL OR toLower(g.prompt) CONTAINS $prompt) "
)

LIST_GRAPHS_BY_ID: Final = (
    _LIST_GRAPHS_FILTER + "AND g.graph_id > $after_id "
    "RETURN properties(g) AS p ORDER BY g.graph_id LIMIT $limit"
)

LIST_GRAPHS_NEWEST: Final = (
    _LIST_GRAPHS_FILTER + "AND (g.created_at < $after_created "
    "OR (g.created_at = $after_created AND g.graph_id < $after_id)) "
    "RETURN properties(g) AS p ORDER BY g.created_at DESC, g.graph_id DESC LIMIT $limit"
)
