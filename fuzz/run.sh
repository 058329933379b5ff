#!/usr/bin/env bash
# Runs the fuzz targets (cargo-fuzz, libFuzzer, the nightly toolchain), one after another, each
# until 10,000,000 executions or SECONDS (default 1800), with a 1 s limit per input and 1 GiB
# of memory (RSS and any one allocation). Seeds each corpus from the repository's test files and
# the traces (read from $TOPOPLACE_TRACES or ../../shared/traces, never copied into the repo).
#
#   fuzz/run.sh [SECONDS] [target ...]        (default: every target of `cargo fuzz list`)
#
# Corpora go to $CORPUS (default: a new temporary folder); crashes, slow inputs and over-limit
# allocations go to fuzz/artifacts/<target>/ (not committed: each becomes a regression test in
# the project's test suite, as fuzz/README.md says). Prints one summary line per target, and
# exits 1 when any target found something or failed to run.
set -euo pipefail
cd "$(dirname "$0")"
LIMIT_S=${1:-1800}
shift || true
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
TARGETS=${*:-$(cargo +nightly fuzz list)}
TRACES=${TOPOPLACE_TRACES:-../../shared/traces}
CORPUS=${CORPUS:-$(mktemp -d)}
TESTDATA=../testdata

seed() {
  local target=$1 dir=$CORPUS/$1
  mkdir -p "$dir"
  case $target in
    cluster_yaml) cp "$TESTDATA"/clusters/*.yaml "$TESTDATA"/extender/cluster.yaml "$dir"/ ;;
    workload_yaml) cp "$TESTDATA"/workloads/*.yaml "$dir"/ ;;
    extender_filter | extender_prioritize) cp "$TESTDATA"/extender/filter-args*.json "$TESTDATA"/extender/prioritize-args.json "$dir"/ ;;
    extender_preempt) cp "$TESTDATA"/extender/preempt-args*.json "$dir"/ ;;
    extender_bind) cp "$TESTDATA"/extender/bind-args*.json "$dir"/ ;;
    pod_node)
      # The pods of the extender fixtures and the nodes of the real kube-scheduler scenario, as JSON.
      python3 - "$dir" "$TESTDATA"/extender/filter-args-nodes.json "$TESTDATA"/extender/preempt-args-victims.json <<'PY'
import json, sys
out = sys.argv[1]
n = 0
for path in sys.argv[2:]:
    args = json.load(open(path))
    objects = [args["Pod"]] + args.get("Nodes", {}).get("items", [])
    for victims in (args.get("NodeNameToVictims") or {}).values():
        objects += victims.get("Pods") or []
    for obj in objects:
        n += 1
        json.dump(obj, open(f"{out}/object-{n}.json", "w"))
PY
      ;;
    trace_csv)
      # The first byte picks the reader (0 openb nodes, 1 openb pods, 2 ElasticFlow jobs).
      if [ -d "$TRACES" ]; then
        { printf '\x00'; head -c 20000 "$TRACES"/alibaba-gpu-v2023/openb_node_list_gpu_node.csv; } >"$dir/openb-nodes"
        { printf '\x01'; head -c 20000 "$TRACES"/alibaba-gpu-v2023/openb_pod_list_default.csv; } >"$dir/openb-pods"
        { printf '\x02'; head -c 20000 "$TRACES"/elasticflow/cluster01.csv; } >"$dir/elasticflow"
      fi
      ;;
  esac
}

status=0
for target in $TARGETS; do
  seed "$target"
  mkdir -p "artifacts/$target"
  log="$CORPUS/$target.log"
  set +e
  cargo +nightly fuzz run -O "$target" "$CORPUS/$target" -- \
    -runs=10000000 -max_total_time="$LIMIT_S" -timeout=1 -rss_limit_mb=1024 -malloc_limit_mb=1024 \
    -print_final_stats=1 -artifact_prefix="artifacts/$target/" >"$log" 2>&1
  rc=$?
  set -e
  # A finding (crash, slow input, allocation over the limit) prints no "Done" line.
  runs=$(grep -oE 'stat::number_of_executed_units: +[0-9]+' "$log" | awk '{print $2}' | tail -1 || true)
  rss=$(grep -oE 'stat::peak_rss_mb: +[0-9]+' "$log" | awk '{print $2}' | tail -1 || true)
  secs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | awk '{print $5}' | tail -1 || true)
  slowest=$(grep -oE 'stat::slowest_unit_time_sec: +[0-9]+' "$log" | awk '{print $2}' | tail -1 || true)
  found=$(find "artifacts/$target" -type f | wc -l)
  echo "$target: exit $rc, ${runs:-?} executions in ${secs:-?} s, slowest input ${slowest:-?} s, peak RSS ${rss:-?} MB, artifacts $found (log $log)"
  if [ "$rc" != 0 ] || [ "$found" != 0 ]; then status=1; fi
done
exit $status
