#!/usr/bin/env bash
# Retrieval quality on the bilingual man-page dev set (benches/devset/README.md).
#
# Builds the set from the installed `manpages` + `manpages-ru`, ingests English and Russian pages
# together into a fresh temporary embedded store with the real binary (`ragpool ingest`), asks
# every question through `ragpool search` (the ranking `ask` uses), and prints R@1, R@5 and
# MRR@10 per language as a Markdown table row set, plus retrieval latency on stderr.
#
#   benches/retrieval.sh [LABEL]
#   RAGPOOL_BIN=target/release/ragpool   the binary (default: target/debug/ragpool)
#   RAGPOOL_BENCH_CONFIG=extra.toml      TOML appended to the bench config (e.g. an [embed] table)
#   RAGPOOL_DEVSET=/path                 reuse a built dev set instead of building one
#   RAGPOOL_BENCH_LISTS="lexical dense both"   the result lists to score, one table row set each
#                                        (default: lexical; dense and both need an [embed] table)
#   RAGPOOL_BENCH_STORE=/path            keep the store there and reuse it (an unchanged page is
#                                        not re-ingested: use a fresh path after a chunking change)
#   RAGPOOL_BENCH_OUT=/path              keep each list's results.jsonl there
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${RAGPOOL_BIN:-$REPO/target/debug/ragpool}"
LABEL="${1:-lexical}"
log() { printf '[retrieval] %s\n' "$*" >&2; }

for pkg in manpages manpages-ru groff-base; do
    dpkg -s "$pkg" >/dev/null 2>&1 || {
        log "$pkg is not installed: apt-get update && apt-get install -y manpages manpages-ru groff-base"
        exit 1
    }
done
[ -x "$BIN" ] || { log "no binary at $BIN (cargo build first)"; exit 1; }

WORK="$(mktemp -d /tmp/ragpool-retrieval.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
DEVSET="${RAGPOOL_DEVSET:-$WORK/devset}"
if [ ! -f "$DEVSET/questions.tsv" ]; then
    mkdir -p "$DEVSET"
    log "building the dev set in $DEVSET"
    python3 "$REPO/benches/devset/build.py" "$DEVSET" >&2
fi
STORE="${RAGPOOL_BENCH_STORE:-$WORK/data}"
cat > "$WORK/workers.toml" <<TOML
[store]
path = "$STORE"
[rag]
docs_dir = "$WORK/no-docs"
TOML
[ -n "${RAGPOOL_BENCH_CONFIG:-}" ] && cat "$RAGPOOL_BENCH_CONFIG" >> "$WORK/workers.toml"
log "ingesting $(find "$DEVSET/corpus" -name '*.md' | wc -l) pages"
"$BIN" ingest --config "$WORK/workers.toml" "$DEVSET/corpus" > "$WORK/ingest.log"
echo "| change | lang | questions | R@1 | R@5 | MRR@10 |"
echo "|---|---|---|---|---|---|"
for lists in ${RAGPOOL_BENCH_LISTS:-lexical}; do
    cut -f2 "$DEVSET/questions.tsv" |
        "$BIN" search --config "$WORK/workers.toml" --k 10 --lists "$lists" > "$WORK/results.jsonl"
    [ -n "${RAGPOOL_BENCH_OUT:-}" ] && mkdir -p "$RAGPOOL_BENCH_OUT" &&
        cp "$WORK/results.jsonl" "$RAGPOOL_BENCH_OUT/$LABEL-$lists.jsonl"
    python3 "$REPO/benches/devset/score.py" "$DEVSET/questions.tsv" "$WORK/results.jsonl" "$LABEL, $lists"
done
