#!/usr/bin/env bash
# Streaming-answer benchmark (#11): ragpool at c=32/256/1000/5000 against a fast FAKE Ollama
# (examples/fake_ollama.rs: the test suite's wire-level fake as a process; 100 tokens over 3 s),
# the fake alone at the same concurrency (its own latency is the floor), ragpool with
# reuse_port at c=1000 (the kernel's spread, for comparison), and Gunicorn 4 sync workers with
# an equivalent Flask app (benches/ask_load/flask_app.py) against the same fake.
#
# Usage (from anywhere in the repo):
#   bash benches/ask_load.sh
#
# Knobs (environment variables, all optional):
#   BENCH_LEVELS="32 256 1000 5000"  concurrency levels (wrk -c) for ragpool and the fake
#   BENCH_DURATION=20s     wrk duration of each run
#   BENCH_ROUNDS=1         rounds per level (medians across rounds when > 1)
#   BENCH_WORKERS=4        workers of ragpool and Gunicorn
#   BENCH_SETTLE=30        seconds sampled after the last ragpool run ("30 s after")
#   BENCH_GUNICORN_C=32    Gunicorn's concurrency (one answer per sync worker at a time)
#   BENCH_GUNICORN_DURATION=40s
#   BENCH_PROFILE=release  cargo profile of ragpool and the fake (dev: a quick smoke run)
#   BENCH_MALLOC=""        run ragpool with LD_PRELOAD of this allocator (allocator comparison)
#   BENCH_MALLOC_ENV=""    extra environment for ragpool, e.g. "MALLOC_ARENA_MAX=2" (glibc tuning)
#   BENCH_REUSEPORT=1      0 skips the reuse_port run
#   BENCH_GUNICORN=1       0 skips Gunicorn + Flask (a shortened allocator comparison)
#   BENCH_VENV=target/bench-venv  venv with gunicorn and flask (created once, then reused)
#   BENCH_OUT=target/bench-results/ask-<timestamp>
#
# Loopback only, free ports picked at start; every process started is stopped by its PID on
# exit. Samples (threads, RSS, PSS per process, /status connections per worker) every 0.25 s.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

LEVELS="${BENCH_LEVELS:-32 256 1000 5000}"
DURATION="${BENCH_DURATION:-20s}"
ROUNDS="${BENCH_ROUNDS:-1}"
WORKERS="${BENCH_WORKERS:-4}"
SETTLE="${BENCH_SETTLE:-30}"
GUNICORN_C="${BENCH_GUNICORN_C:-32}"
GUNICORN_DURATION="${BENCH_GUNICORN_DURATION:-40s}"
MALLOC="${BENCH_MALLOC:-}"
MALLOC_ENV="${BENCH_MALLOC_ENV:-}"
RUN_REUSEPORT="${BENCH_REUSEPORT:-1}"
RUN_GUNICORN="${BENCH_GUNICORN:-1}"
PROFILE="${BENCH_PROFILE:-release}"
VENV="${BENCH_VENV:-$REPO/target/bench-venv}"
OUT="${BENCH_OUT:-$REPO/target/bench-results/ask-$(date +%Y%m%d-%H%M%S)}"
READY_TIMEOUT=30
ASK="$REPO/benches/ask_load"

BENCH_TAG=ask_load.sh
# shellcheck source=benches/lib.sh
source "$REPO/benches/lib.sh"

require_tools curl python3 cargo pgrep
setup_cleanup
mkdir -p "$OUT"
# wrk at c=5000 and the servers hold thousands of sockets each.
ulimit -n "$(ulimit -Hn)"

log "building ragpool and the fake Ollama (cargo build --profile $PROFILE)"
cargo build --profile "$PROFILE" --bin ragpool --example fake_ollama >&2
TARGET_DIR="$REPO/target/$([[ "$PROFILE" == dev ]] && echo debug || echo "$PROFILE")"
RAGPOOL_BIN="$TARGET_DIR/ragpool"
FAKE_BIN="$TARGET_DIR/examples/fake_ollama"

if [[ ! -x "$VENV/bin/gunicorn" ]] || ! "$VENV/bin/python" -c 'import flask' 2>/dev/null; then
    log "pip install gunicorn flask into $VENV"
    [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet gunicorn flask
fi

# --- the fake ------------------------------------------------------------------------------------
"$FAKE_BIN" >"$OUT/fake.log" 2>&1 &
FAKE_PID=$!
STARTED_PIDS+=("$FAKE_PID")
for _ in $(seq 100); do grep -q '^listening ' "$OUT/fake.log" && break; sleep 0.1; done
FAKE_URL="$(awk '/^listening / {print $2; exit}' "$OUT/fake.log")"
[[ -n "$FAKE_URL" ]] || die "the fake Ollama did not start (log: $OUT/fake.log)"
FAKE_PORT="${FAKE_URL##*:}"
log "fake Ollama at $FAKE_URL (PID $FAKE_PID)"

SAMPLES="$OUT/samples.tsv"
RESULTS="$OUT/results.tsv"
printf 'server\tc\tround\tanswers_per_s\tp50_ms\tp99_ms\trequests\terrors\n' >"$RESULTS"
PHASE="$TMP/phase"

wrk_run() { # wrk_run NAME PORT PATH C DURATION ROUND
    local name="$1" port="$2" path="$3" c="$4" duration="$5" round="$6" file rps p50 p99 reqs non2xx sock
    file="$OUT/$name-c$c-r$round.txt"
    log "$name c=$c round $round ($duration)"
    WRK_PATH="$path" wrk -t 2 -c "$c" -d "$duration" --timeout 60s --latency -s "$ASK/post.lua" \
        "http://127.0.0.1:$port$path" >"$file" 2>&1 || die "wrk against $name failed (see $file)"
    rps="$(awk '/^Requests\/sec:/ {print $2}' "$file")"
    p50="$(to_ms "$(awk '$1 == "50%" {print $2}' "$file")")"
    p99="$(to_ms "$(awk '$1 == "99%" {print $2}' "$file")")"
    reqs="$(awk '/requests in/ {print $1}' "$file")"
    non2xx="$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$file")"
    sock="$(awk '/Socket errors:/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$file")"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$c" "$round" "$rps" "$p50" "$p99" "$reqs" \
        "$(( ${non2xx:-0} + ${sock:-0} ))" >>"$RESULTS"
}

start_ragpool() { # start_ragpool NAME REUSE_PORT: sets RP_PID RP_PORT
    local name="$1" reuse="$2"
    RP_PORT="$(free_port)"
    mkdir -p "$TMP/$name"
    cat >"$TMP/$name/workers.toml" <<EOF
workers = $WORKERS
bind = ["127.0.0.1:$RP_PORT"]
backlog = 4096
worker_connections = 4000
reuse_port = $reuse
accesslog = ""
loglevel = "warn"
admin_token = "bench"
[store]
path = "$TMP/$name/data"
[llm]
provider = "ollama"
url = "$FAKE_URL"
model = "llama3.2"
first_token_timeout = 60
timeout = 120
[rag]
ingest_docs_on_first_run = false
EOF
    local -a env_vars=()
    [[ -n "$MALLOC" ]] && env_vars+=("LD_PRELOAD=$MALLOC")
    # shellcheck disable=SC2206 # word splitting is the point: "A=1 B=2"
    [[ -n "$MALLOC_ENV" ]] && env_vars+=($MALLOC_ENV)
    env "${env_vars[@]}" "$RAGPOOL_BIN" serve --config "$TMP/$name/workers.toml" >"$OUT/$name.log" 2>&1 &
    RP_PID=$!
    STARTED_PIDS+=("$RP_PID")
    wait_ready "$name" "$RP_PID" "$RP_PORT"
    curl -fsS -o /dev/null "http://127.0.0.1:$RP_PORT/api/documents" -H 'Authorization: Bearer bench' \
        -H 'Content-Type: application/json' \
        -d '{"title":"Reload","text":"# Reload\n\nSend HUP to the master to reload the workers without downtime."}' ||
        die "cannot seed $name"
}

stop_ragpool() {
    echo stop >"$PHASE"
    stop_pid "$RP_PID" 30
    wait "$RP_PID" 2>/dev/null || true
}

# --- ragpool, shared listener: idle, each level (the fake alone first), 30 s after ------------
start_ragpool ragpool false
echo idle >"$PHASE"
python3 "$ASK/sample.py" "$RP_PID" "$RP_PORT" "$PHASE" "$SAMPLES.ragpool" &
STARTED_PIDS+=($!)
sleep 5
for c in $LEVELS; do
    for ((round = 1; round <= ROUNDS; round++)); do
        echo "fake-c$c" >"$PHASE"
        wrk_run fake "$FAKE_PORT" /api/chat "$c" "$DURATION" "$round"
        echo "c$c" >"$PHASE"
        wrk_run ragpool "$RP_PORT" /api/ask/stream "$c" "$DURATION" "$round"
    done
done
echo after >"$PHASE"
log "sampling ragpool for ${SETTLE}s after the load"
sleep "$SETTLE"
stop_ragpool

# --- ragpool with reuse_port at c=1000: the kernel's spread -----------------------------------
if [[ "$RUN_REUSEPORT" == 1 ]]; then
start_ragpool ragpool-reuseport true
echo idle >"$PHASE"
python3 "$ASK/sample.py" "$RP_PID" "$RP_PORT" "$PHASE" "$SAMPLES.reuseport" &
STARTED_PIDS+=($!)
sleep 2
echo c1000 >"$PHASE"
wrk_run ragpool-reuseport "$RP_PORT" /api/ask/stream 1000 "$DURATION" 1
stop_ragpool
fi

# --- Gunicorn 4 sync workers + Flask against the same fake ------------------------------------
if [[ "$RUN_GUNICORN" == 1 ]]; then
GU_PORT="$(free_port)"
FAKE_OLLAMA_URL="$FAKE_URL" FLASK_DB="$TMP/flask.sqlite3" "$VENV/bin/gunicorn" --chdir "$ASK" \
    -w "$WORKERS" -k sync --timeout 120 -b "127.0.0.1:$GU_PORT" --log-level warning \
    flask_app:app >"$OUT/gunicorn.log" 2>&1 &
GU_PID=$!
STARTED_PIDS+=("$GU_PID")
wait_ready gunicorn "$GU_PID" "$GU_PORT"
echo idle >"$PHASE"
python3 "$ASK/sample.py" "$GU_PID" - "$PHASE" "$SAMPLES.gunicorn" &
STARTED_PIDS+=($!)
sleep 3
echo "c$GUNICORN_C" >"$PHASE"
wrk_run gunicorn "$GU_PORT" /api/ask/stream "$GUNICORN_C" "$GUNICORN_DURATION" 1
echo fake-gunicorn >"$PHASE"
wrk_run fake "$FAKE_PORT" /api/chat "$GUNICORN_C" "$GUNICORN_DURATION" g
echo stop >"$PHASE"
fi

# --- report -----------------------------------------------------------------------------------
python3 "$ASK/report.py" "$OUT" "$WORKERS" "$(nproc)" "$(uname -r)" "${MALLOC:-glibc}${MALLOC_ENV:+ $MALLOC_ENV}" | tee "$OUT/report.txt"
