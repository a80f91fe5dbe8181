#!/usr/bin/env bash
# The CLI on an accelerator against the CPU: train a transcoder set on the device, then
# attribute one IOI prompt on both (default logit targets, and a logit difference) in
# float64 and compare the JSON graphs and the artifacts. Usage (repository root, zoo
# models under $CIRCUITSCOPE_HOME/zoo): bash benchmarks/device_cli_check.sh [ZOO_IOI_DIR]
# Works in a fresh temporary directory, removed on exit.
set -e
Z=${1:-${CIRCUITSCOPE_HOME:-$HOME/.cache/circuitscope}/zoo/ioi-gpt2}
W=$(mktemp -d "${TMPDIR:-/tmp}/clicheck.XXXXXX")
trap 'rm -rf "$W"' EXIT
export W
P="After Sarah and Mary arrived at the park, Sarah handed a flower to"
cs(){ python3 -m service "$@"; }
cs transcoders train --model "$Z" --device cuda --steps 300 --width 256 --out "$W/tc" --no-eval
for d in cpu cuda; do
  cs attribute --model "$Z" --transcoders "$W/tc" --device $d --dtype float64 --out "$W/g_$d" --json "$W/g_$d.json" "$P"
  cs attribute --model "$Z" --transcoders "$W/tc" --device $d --dtype float64 --logit-diff " Mary" " Sarah" --json "$W/d_$d.json" "$P"
done
python3 - <<'PY'
import json, os
w = os.environ["W"]
for n in ("g", "d"):
    a, b = (json.load(open(f"{w}/{n}_{d}.json")) for d in ("cpu", "cuda"))
    na = [x["node_id"] for x in a["nodes"]]; nb = [x["node_id"] for x in b["nodes"]]
    ea = {(l["source"], l["target"]): l["weight"] for l in a["links"]}
    eb = {(l["source"], l["target"]): l["weight"] for l in b["links"]}
    diff = max(abs(ea[k] - eb[k]) for k in ea) if set(ea) == set(eb) else None
    print(n, "nodes", len(na), "same nodes", na == nb, "links", len(ea), "same links", set(ea) == set(eb), "max |w diff|", diff, "max |w|", max(abs(v) for v in ea.values()))
from ingest.attribution.artifact import load_artifact
a, b = (load_artifact(f"{w}/g_{d}") for d in ("cpu", "cuda"))
print("artifact adjacency max |diff| / max", float((a.adjacency.double() - b.adjacency.double()).abs().max() / a.adjacency.abs().max()), a.adjacency.shape, a.adjacency.device, b.adjacency.device)
PY
