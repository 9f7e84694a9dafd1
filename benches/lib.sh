# Shared functions of the benchmark scripts (benches/load.sh, benches/metrics_overhead.sh).
# Sourced, not run. The caller sets `set -euo pipefail`, REPO, BENCH_TAG (log prefix) and, before
# using the functions that need them: OUT, WORKERS, READY_TIMEOUT, ROUNDS, DURATION, WRK_ARGS,
# RESULTS, and the functions port_of NAME / pid_of NAME (used by run_one).
#
# Every process a script starts goes into STARTED_PIDS; the EXIT trap stops exactly those PIDs.

log() { printf '[%s] %s\n' "$BENCH_TAG" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$BENCH_TAG" "$*" >&2; exit 1; }

# require_tools TOOL...: wrk (with an install hint) and the other tools the scripts use
require_tools() {
    local tool
    if ! command -v wrk >/dev/null 2>&1; then
        die "wrk is not installed. Install it with:  apt-get update && apt-get install -y wrk"
    fi
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || die "'$tool' is required but not found on PATH"
    done
}

# --- cleanup: stop only what we started, by PID ------------------------------------------------
stop_pid() { # stop_pid PID [grace-seconds]: SIGTERM, wait, SIGKILL if still there
    local pid="$1" grace="${2:-15}" i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "PID $pid did not stop within ${grace}s of SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? pid
    for pid in "${STARTED_PIDS[@]+"${STARTED_PIDS[@]}"}"; do
        stop_pid "$pid" 15
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
    exit "$rc"
}

# setup_cleanup: creates TMP (removed on exit) and installs the traps. Call from the main shell.
setup_cleanup() {
    TMP="$(mktemp -d "${TMPDIR:-/tmp}/ragpool-bench.XXXXXX")"
    STARTED_PIDS=()
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# build_ragpool: cargo build --release, sets RAGPOOL_BIN
build_ragpool() {
    log "building ragpool (cargo build --release)"
    cargo build --release >&2
    RAGPOOL_BIN="$REPO/target/release/ragpool"
    [[ -x "$RAGPOOL_BIN" ]] || die "$RAGPOOL_BIN was not built"
}

wait_ready() { # wait_ready NAME PID PORT: /health answers 200 and the master has all its workers
    local name="$1" pid="$2" port="$3" deadline=$((SECONDS + READY_TIMEOUT)) children
    while ((SECONDS < deadline)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$OUT/$name.log" >&2 || true
            die "$name (PID $pid) exited before it was ready; log above ($OUT/$name.log)"
        fi
        children="$( (pgrep -P "$pid" || true) | wc -l)"
        if ((children >= WORKERS)) &&
            curl -fsS --max-time 1 "http://127.0.0.1:$port/health" >/dev/null 2>&1; then
            log "$name ready: /health = $(curl -fsS --max-time 1 "http://127.0.0.1:$port/health"), $children worker processes"
            return 0
        fi
        sleep 0.2
    done
    tail -n 30 "$OUT/$name.log" >&2 || true
    die "$name did not answer 200 on http://127.0.0.1:$port/health with $WORKERS workers within ${READY_TIMEOUT}s"
}

# --- measured rounds ---------------------------------------------------------------------------
# wrk latency value ("515.00us", "1.23ms", "2.00s", "1.00m") -> milliseconds
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v; sub(/[a-z]+$/, "", n); u = v; sub(/^[0-9.]+/, "", u)
        f = (u == "us") ? 0.001 : (u == "ms") ? 1 : (u == "s") ? 1000 : (u == "m") ? 60000 : -1
        if (f < 0) { print "NaN"; exit }
        printf "%.3f", n * f
    }'
}

# write_results_header: the TSV header run_one appends to
write_results_header() {
    printf 'round\tserver\treq_per_s\tp50_ms\tp90_ms\tp99_ms\trequests\tnon2xx3xx\tsock_connect\tsock_read\tsock_write\tsock_timeout\n' >"$RESULTS"
}

run_one() { # run_one ROUND NAME: one measured wrk run against NAME, one row appended to RESULTS
    local round="$1" name="$2" port pid file rps p50 p90 p99 reqs non2xx sock
    port="$(port_of "$name")"
    pid="$(pid_of "$name")"
    file="$OUT/round$round-$name.txt"
    log "round $round/$ROUNDS: $name (wrk ${WRK_ARGS[*]} -d $DURATION)"
    wrk "${WRK_ARGS[@]}" -d "$DURATION" "http://127.0.0.1:$port/health" >"$file" 2>&1 ||
        die "wrk against $name failed (see $file)"
    kill -0 "$pid" 2>/dev/null || die "$name master (PID $pid) died during round $round (log: $OUT/$name.log)"
    rps="$(awk '/^Requests\/sec:/ {print $2}' "$file")"
    p50="$(to_ms "$(awk '$1 == "50%" {print $2}' "$file")")"
    p90="$(to_ms "$(awk '$1 == "90%" {print $2}' "$file")")"
    p99="$(to_ms "$(awk '$1 == "99%" {print $2}' "$file")")"
    reqs="$(awk '/requests in/ {print $1}' "$file")"
    non2xx="$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$file")"
    # "Socket errors: connect 0, read 0, write 0, timeout 0" (printed only when non-zero)
    sock="$(awk '/Socket errors:/ {gsub(",", ""); print $4, $6, $8, $10}' "$file")"
    [[ -n "$rps" && -n "$reqs" ]] || die "could not parse wrk output in $file"
    read -r sc sr sw st <<<"${sock:-0 0 0 0}"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$rps" "$p50" "$p90" "$p99" \
        "$reqs" "${non2xx:-0}" "$sc" "$sr" "$sw" "$st" >>"$RESULTS"
}

warm_up() { # warm_up NAME...: a short wrk run against each, output kept in $OUT
    local name
    for name in "$@"; do
        log "warm-up $name for $WARMUP"
        wrk "${WRK_ARGS[@]}" -d "$WARMUP" "http://127.0.0.1:$(port_of "$name")/health" \
            >"$OUT/warmup-$name.txt" 2>&1 || die "wrk warm-up against $name failed (see $OUT/warmup-$name.txt)"
    done
}

run_rounds() { # run_rounds A B: $ROUNDS rounds into $OUT/results.tsv, alternating who goes first
    RESULTS="$OUT/results.tsv"
    write_results_header
    local round name order
    for ((round = 1; round <= ROUNDS; round++)); do
        if ((round % 2 == 1)); then order=("$1" "$2"); else order=("$2" "$1"); fi
        for name in "${order[@]}"; do run_one "$round" "$name"; done
    done
}
