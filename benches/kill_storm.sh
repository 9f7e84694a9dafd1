#!/usr/bin/env bash
# Capacity under a kill storm: ragpool with a random worker SIGKILLed every 0.5 s ("storm") vs.
# the same ragpool left alone ("calm"), GET /health under wrk's keep-alive load, measured in the
# same run, alternating which goes first.
#
# Usage (from anywhere in the repo):
#   bash benches/kill_storm.sh
#
# Knobs (environment variables, all optional; same names as benches/load.sh):
#   BENCH_DURATION=10s   wrk duration of each measured run
#   BENCH_ROUNDS=5       rounds; each round measures both instances
#   BENCH_WARMUP=2s      wrk warm-up per instance before the first round (not measured)
#   BENCH_CONNECTIONS=64 wrk -c
#   BENCH_THREADS=2      wrk -t
#   BENCH_WORKERS=4      worker processes per instance
#   BENCH_KILL_EVERY=0.5 seconds between two SIGKILLs during the storm instance's runs
#   BENCH_OUT=target/bench-results/kill-storm-<timestamp>  raw wrk outputs, logs, results.tsv
#
# Reports per round and as medians: the storm instance's requests/s as a ratio of the calm
# one's, and the failed requests (wrk's socket errors + non-2xx) per kill. Then checks that the
# storm instance counted exactly one ragpool_worker_restarts_total{cause="crash"} per kill.
# Only loopback (127.0.0.1) is used, on free ports picked at start. Every process the script
# starts is stopped by its PID on exit.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

DURATION="${BENCH_DURATION:-10s}"
ROUNDS="${BENCH_ROUNDS:-5}"
WARMUP="${BENCH_WARMUP:-2s}"
CONNECTIONS="${BENCH_CONNECTIONS:-64}"
THREADS="${BENCH_THREADS:-2}"
WORKERS="${BENCH_WORKERS:-4}"
KILL_EVERY="${BENCH_KILL_EVERY:-0.5}"
OUT="${BENCH_OUT:-$REPO/target/bench-results/kill-storm-$(date +%Y%m%d-%H%M%S)}"
READY_TIMEOUT=20
CRASHES='ragpool_worker_restarts_total{cause="crash"}'

BENCH_TAG=kill_storm.sh
# shellcheck source=benches/lib.sh
source "$REPO/benches/lib.sh"

require_tools curl python3 cargo pgrep
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive integer (got '$ROUNDS')"

setup_cleanup
mkdir -p "$OUT"
GIT_REV="$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)"
build_ragpool

CALM_PORT="$(free_port)"
STORM_PORT="$(free_port)"
while [[ "$STORM_PORT" == "$CALM_PORT" ]]; do STORM_PORT="$(free_port)"; done

start_instance() { # start_instance NAME PORT -> sets LAST_PID
    local name="$1" port="$2"
    cat >"$TMP/$name.toml" <<EOF
workers = $WORKERS
bind = ["127.0.0.1:$port"]
accesslog = ""
loglevel = "warn"

[store]
path = "$TMP/store-$name"

[rag]
ingest_docs_on_first_run = false
EOF
    cp "$TMP/$name.toml" "$OUT/$name.toml"
    log "starting $name on 127.0.0.1:$port ($WORKERS workers)"
    "$RAGPOOL_BIN" serve --config "$TMP/$name.toml" >"$OUT/$name.log" 2>&1 &
    LAST_PID=$!
    STARTED_PIDS+=("$LAST_PID")
}

start_instance calm "$CALM_PORT"
CALM_PID=$LAST_PID
start_instance storm "$STORM_PORT"
STORM_PID=$LAST_PID
wait_ready calm "$CALM_PID" "$CALM_PORT"
wait_ready storm "$STORM_PID" "$STORM_PORT"

port_of() { if [[ "$1" == calm ]]; then echo "$CALM_PORT"; else echo "$STORM_PORT"; fi; }
pid_of() { if [[ "$1" == calm ]]; then echo "$CALM_PID"; else echo "$STORM_PID"; fi; }

crash_count() {
    curl -fsS --max-time 5 "http://127.0.0.1:$STORM_PORT/metrics" |
        awk -v s="$CRASHES" '$1 == s {print $2}' | head -n1
}

# kill_workers FILE: every KILL_EVERY seconds, SIGKILL one random worker of the storm master and
# append its pid to FILE; runs until stopped.
kill_workers() {
    local file="$1" pids victim
    while true; do
        sleep "$KILL_EVERY"
        mapfile -t pids < <(pgrep -P "$STORM_PID" || true)
        ((${#pids[@]} > 0)) || continue
        victim="${pids[RANDOM % ${#pids[@]}]}"
        if kill -KILL "$victim" 2>/dev/null; then echo "$victim" >>"$file"; fi
    done
}

WRK_ARGS=(-t "$THREADS" -c "$CONNECTIONS" --latency)
warm_up calm storm
CRASHES_BEFORE="$(crash_count)"

RESULTS="$OUT/results.tsv"
write_results_header
for ((round = 1; round <= ROUNDS; round++)); do
    if ((round % 2 == 1)); then order=(calm storm); else order=(storm calm); fi
    for name in "${order[@]}"; do
        if [[ "$name" == storm ]]; then
            : >"$OUT/kills-round$round.txt"
            kill_workers "$OUT/kills-round$round.txt" &
            KILLER=$!
            STARTED_PIDS+=("$KILLER")
            run_one "$round" storm
            kill -TERM "$KILLER" 2>/dev/null || true
            wait "$KILLER" 2>/dev/null || true
        else
            run_one "$round" calm
        fi
    done
done

# The storm instance recovers to every worker, and counted each kill once.
deadline=$((SECONDS + READY_TIMEOUT))
while (($(pgrep -P "$STORM_PID" | wc -l) < WORKERS)) && ((SECONDS < deadline)); do sleep 0.2; done
sleep 1 # let the last replacement report ready before reading the counter
CRASHES_AFTER="$(crash_count)"
KILLS="$(cat "$OUT"/kills-round*.txt | wc -l)"

log "stopping both instances (SIGTERM to masters $CALM_PID, $STORM_PID)"
kill -TERM "$CALM_PID" "$STORM_PID"
CALM_RC=0
wait "$CALM_PID" || CALM_RC=$?
STORM_RC=0
wait "$STORM_PID" || STORM_RC=$?

python3 - "$RESULTS" "$OUT" "$GIT_REV" "$KILLS" "${CRASHES_BEFORE:-0}" "${CRASHES_AFTER:-0}" \
    "$CALM_RC" "$STORM_RC" "$KILL_EVERY" "$CONNECTIONS" "$WORKERS" <<'PY' | tee "$OUT/report.txt"
import csv, statistics, sys
results, out, rev, kills, before, after, calm_rc, storm_rc, every, conns, workers = sys.argv[1:]
rows = list(csv.DictReader(open(results), delimiter="\t"))
rounds = sorted({int(r["round"]) for r in rows})
def row(rnd, name):
    return next(r for r in rows if int(r["round"]) == rnd and r["server"] == name)
def failed(r):
    return sum(int(r[k]) for k in ("non2xx3xx", "sock_connect", "sock_read", "sock_write", "sock_timeout"))
ratios, per_kill = [], []
print(f"kill storm bench ({rev}): a random worker SIGKILLed every {every} s during the storm runs")
print("round  calm req/s  storm req/s  ratio  kills  failed  failed/kill")
for rnd in rounds:
    calm, storm = row(rnd, "calm"), row(rnd, "storm")
    n = sum(1 for _ in open(f"{out}/kills-round{rnd}.txt"))
    ratio = float(storm["req_per_s"]) / float(calm["req_per_s"])
    ratios.append(ratio)
    per_kill.append(failed(storm) / max(n, 1))
    print(f"{rnd:>5}  {float(calm['req_per_s']):>10.0f}  {float(storm['req_per_s']):>11.0f}  {ratio:5.3f}  {n:>5}  {failed(storm):>6}  {per_kill[-1]:>11.2f}")
print(f"median storm/calm req/s: {statistics.median(ratios):.3f}; median failed per kill: {statistics.median(per_kill):.2f}"
      f" (a worker holds {int(conns) / int(workers):.0f} of wrk's {conns} keep-alive connections on average,"
      " each with one request in flight)")
counted = float(after) - float(before)
print(f"crash restarts counted during the rounds: {counted:.0f} for {kills} kills; exit status calm={calm_rc} storm={storm_rc}")
if counted != float(kills):
    sys.exit("restart count does not match the kills")
if calm_rc != "0" or storm_rc != "0":
    sys.exit("a master did not exit 0")
PY
