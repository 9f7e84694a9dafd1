#!/usr/bin/env bash
# Cost of per-request metrics on the hot path: ragpool with `metrics = true` vs. ragpool with
# `metrics = false` (same binary, same settings otherwise), GET /health, measured in the same run.
#
# Usage (from anywhere in the repo):
#   bash benches/metrics_overhead.sh
#
# Knobs (environment variables, all optional; same names as benches/load.sh):
#   BENCH_DURATION=10s   wrk duration of each measured run
#   BENCH_ROUNDS=5       rounds; each round measures both instances, alternating which goes first
#   BENCH_WARMUP=2s      wrk warm-up per instance before the first round (not measured)
#   BENCH_CONNECTIONS=64 wrk -c
#   BENCH_THREADS=2      wrk -t
#   BENCH_WORKERS=4      worker processes per instance
#   BENCH_CONTROL=0      1: A/A control run, the "on" instance also gets `metrics = false`, so any
#                        on/off difference is the setup's own bias and noise (the count check then
#                        expects 0 on both)
#   BENCH_EXACT_CONNS=64, BENCH_EXACT_PER_CONN=200   exact count check after the rounds (see
#                        below); BENCH_EXACT_PER_CONN=0 skips it
#   BENCH_OUT=target/bench-results/metrics-<timestamp>  raw wrk outputs, logs, /metrics, results.tsv
#
# After the runs it fetches /metrics from the metrics-on instance and checks that
# ragpool_http_requests_total{route="health",status="200"} equals the requests wrk counted against
# that instance (warm-up + rounds) plus the readiness probes, give or take the requests in flight
# when each wrk run stopped (at most one per connection); then that the counter grows by exactly
# the responses read by a client that reads all of them; and that the metrics-off instance
# recorded nothing. Only loopback (127.0.0.1) is used, on free ports picked at start. Every
# process the script starts is stopped by its PID on exit.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

DURATION="${BENCH_DURATION:-10s}"
ROUNDS="${BENCH_ROUNDS:-5}"
WARMUP="${BENCH_WARMUP:-2s}"
CONNECTIONS="${BENCH_CONNECTIONS:-64}"
THREADS="${BENCH_THREADS:-2}"
WORKERS="${BENCH_WORKERS:-4}"
CONTROL="${BENCH_CONTROL:-0}"
EXACT_CONNS="${BENCH_EXACT_CONNS:-64}"
EXACT_PER_CONN="${BENCH_EXACT_PER_CONN:-200}"
OUT="${BENCH_OUT:-$REPO/target/bench-results/metrics-$(date +%Y%m%d-%H%M%S)}"
READY_TIMEOUT=20
COUNTER='ragpool_http_requests_total{route="health",status="200"}'

BENCH_TAG=metrics_overhead.sh
# shellcheck source=benches/lib.sh
source "$REPO/benches/lib.sh"

require_tools curl python3 cargo pgrep
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive integer (got '$ROUNDS')"
[[ "$EXACT_CONNS" =~ ^[1-9][0-9]*$ && "$EXACT_PER_CONN" =~ ^[0-9]+$ ]] ||
    die "BENCH_EXACT_CONNS must be a positive and BENCH_EXACT_PER_CONN a non-negative integer"

setup_cleanup
mkdir -p "$OUT"
# What was built: the commit, "-dirty" if the working tree had uncommitted changes.
GIT_REV="$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)"
build_ragpool

# --- start the two instances -------------------------------------------------------------------
# Identical configs except `metrics`. Each instance gets its own store directory under TMP, kept
# empty (no first-run ingestion of docs/), so the two masters share no files, /health's store
# count reads the same empty tables in both, and no ingestion runs in the background.
ON_PORT="$(free_port)"
OFF_PORT="$(free_port)"
while [[ "$OFF_PORT" == "$ON_PORT" ]]; do OFF_PORT="$(free_port)"; done

start_instance() { # start_instance NAME PORT METRICS -> sets LAST_PID
    local name="$1" port="$2" metrics="$3"
    cat >"$TMP/$name.toml" <<EOF
workers = $WORKERS
bind = ["127.0.0.1:$port"]
accesslog = ""
loglevel = "warn"
metrics = $metrics

[store]
path = "$TMP/store-$name"

[rag]
ingest_docs_on_first_run = false
EOF
    cp "$TMP/$name.toml" "$OUT/$name.toml"
    log "starting $name on 127.0.0.1:$port ($WORKERS workers, metrics = $metrics)"
    "$RAGPOOL_BIN" serve --config "$TMP/$name.toml" >"$OUT/$name.log" 2>&1 &
    LAST_PID=$!
    STARTED_PIDS+=("$LAST_PID")
}

ON_METRICS=true
if [[ "$CONTROL" == 1 ]]; then
    ON_METRICS=false
    log "BENCH_CONTROL=1: A/A control, both instances run with metrics = false"
fi
start_instance on "$ON_PORT" "$ON_METRICS"
ON_PID=$LAST_PID
start_instance off "$OFF_PORT" false
OFF_PID=$LAST_PID

wait_ready on "$ON_PID" "$ON_PORT"
wait_ready off "$OFF_PID" "$OFF_PORT"

port_of() { if [[ "$1" == on ]]; then echo "$ON_PORT"; else echo "$OFF_PORT"; fi; }
pid_of() { if [[ "$1" == on ]]; then echo "$ON_PID"; else echo "$OFF_PID"; fi; }

# health_count NAME LABEL: fetch /metrics (saved as metrics-NAME-LABEL.txt), print the /health 200
# counter, 0 when the series is absent (nothing recorded yet), "unavailable" if /metrics failed.
health_count() {
    local name="$1" label="$2" file="$OUT/metrics-$1-$2.txt" n
    if ! curl -fsS --max-time 5 "http://127.0.0.1:$(port_of "$name")/metrics" >"$file" 2>&1; then
        echo unavailable
        return 0
    fi
    n="$(grep -F "$COUNTER " "$file" | awk '{print $2}' | head -n1 || true)"
    echo "${n:-0}"
}

# The readiness probes above already hit /health; count them so the final check can be exact.
# (/metrics requests are counted under route="metrics", not "health".)
ON_BEFORE="$(health_count on before)"
OFF_BEFORE="$(health_count off before)"
log "/health 200 counter before warm-up: on=$ON_BEFORE off=$OFF_BEFORE"

WRK_ARGS=(-t "$THREADS" -c "$CONNECTIONS" --latency)

warm_up on off

# --- measured rounds ---------------------------------------------------------------------------
run_rounds on off

# --- end-to-end counting check -----------------------------------------------------------------
ON_AFTER="$(health_count on after)"
OFF_AFTER="$(health_count off after)"
WRK_ON="$(awk '/requests in/ {s += $1} END {print s + 0}' "$OUT/warmup-on.txt" "$OUT"/round*-on.txt)"
WRK_OFF="$(awk '/requests in/ {s += $1} END {print s + 0}' "$OUT/warmup-off.txt" "$OUT"/round*-off.txt)"

# wrk stops mid-flight, so its total can only bound the counter. For an exact check under
# concurrency: a client that reads every response it asks for, EXACT_CONNS keep-alive connections
# at once, EXACT_PER_CONN requests each, against the "on" instance; the counter must grow by
# exactly the number of 200 responses it read. (Runs after the measured rounds; not timed.)
EXACT_SENT=0
EXACT_OK=0
EXACT_AFTER=skipped
if ((EXACT_PER_CONN > 0)); then
    log "exact count check: $EXACT_CONNS connections x $EXACT_PER_CONN keep-alive GET /health against on"
    read -r EXACT_SENT EXACT_OK < <(python3 - "$ON_PORT" "$EXACT_CONNS" "$EXACT_PER_CONN" <<'PY'
import socket
import sys
import threading

port, conns, per_conn = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
sent, ok, lock = [0], [0], threading.Lock()

def client():
    s = socket.create_connection(("127.0.0.1", port))
    f = s.makefile("rb")
    n_sent = n_ok = 0
    for _ in range(per_conn):
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        n_sent += 1
        status = int(f.readline().split()[1])
        length = 0
        while True:
            line = f.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        f.read(length)
        n_ok += status == 200
    s.close()
    with lock:
        sent[0] += n_sent
        ok[0] += n_ok

threads = [threading.Thread(target=client) for _ in range(conns)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(sent[0], ok[0])
PY
)
    EXACT_AFTER="$(health_count on exact)"
fi

# --- graceful stop of both, checking exit status -----------------------------------------------
log "stopping both instances (SIGTERM to masters $ON_PID, $OFF_PID)"
kill -TERM "$ON_PID" "$OFF_PID"
ON_RC=0
wait "$ON_PID" || ON_RC=$?
OFF_RC=0
wait "$OFF_PID" || OFF_RC=$?
STARTED_PIDS=()
log "exit status: on=$ON_RC off=$OFF_RC"

# --- report ------------------------------------------------------------------------------------
HEADER="$(printf 'ragpool %s (git %s), metrics = %s ("on") vs metrics = false ("off"), %s workers each, GET /health\nwrk: %s, -t %s -c %s -d %s, %s round(s), warm-up %s\nmachine: nproc=%s, kernel %s, load average %s\nraw output: %s' \
    "$("$RAGPOOL_BIN" --version 2>/dev/null | awk '{print $2}')" "$GIT_REV" "$ON_METRICS" "$WORKERS" \
    "$(wrk --version 2>&1 | head -n1 | awk '{print $2}')" "$THREADS" "$CONNECTIONS" "$DURATION" "$ROUNDS" "$WARMUP" \
    "$(nproc)" "$(uname -r)" "$(cut -d' ' -f1-3 /proc/loadavg)" "$OUT")"

set +e
python3 - "$RESULTS" "$HEADER" "$ON_RC" "$OFF_RC" "$ON_BEFORE" "$ON_AFTER" "$WRK_ON" \
    "$OFF_BEFORE" "$OFF_AFTER" "$WRK_OFF" "$((ROUNDS + 1))" "$CONNECTIONS" "$ON_METRICS" \
    "$EXACT_SENT" "$EXACT_OK" "$EXACT_AFTER" "$EXACT_CONNS" <<'PY' | tee "$OUT/report.txt"
import csv
import statistics
import sys

(path, header, on_rc, off_rc, on_before, on_after, wrk_on,
 off_before, off_after, wrk_off, runs, conns, on_metrics,
 exact_sent, exact_ok, exact_after, conns_exact) = sys.argv[1:]
rows = list(csv.DictReader(open(path), delimiter="\t"))
names = ["on", "off"]
cols = ["req_per_s", "p50_ms", "p90_ms", "p99_ms"]
ok = True

print(header)
print()
fmt = "| {:<8} | {:<8} | {:>10} | {:>8} | {:>8} | {:>8} | {:>8} |"
print(fmt.format("round", "metrics", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors"))
print("|" + "|".join("-" * (w + 2) for w in (8, 8, 10, 8, 8, 8, 8)) + "|")

def errors(r):
    return int(r["non2xx3xx"]) + sum(int(r[k]) for k in
                                     ("sock_connect", "sock_read", "sock_write", "sock_timeout"))

for r in rows:
    print(fmt.format(r["round"], r["server"], "%.0f" % float(r["req_per_s"]), "%.3f" % float(r["p50_ms"]),
                     "%.3f" % float(r["p90_ms"]), "%.3f" % float(r["p99_ms"]), errors(r)))
med, rps = {}, {}
for n in names:
    sel = [r for r in rows if r["server"] == n]
    rps[n] = [float(r["req_per_s"]) for r in sel]
    med[n] = {c: statistics.median(float(r[c]) for r in sel) for c in cols}
    print(fmt.format("median", n, "%.0f" % med[n]["req_per_s"], "%.3f" % med[n]["p50_ms"],
                     "%.3f" % med[n]["p90_ms"], "%.3f" % med[n]["p99_ms"], sum(errors(r) for r in sel)))
    if any(errors(r) for r in sel):
        ok = False

ratio = med["on"]["req_per_s"] / med["off"]["req_per_s"]
print()
print("ratio on/off, median req/s:  %.3f  (%+.1f%%)" % (ratio, (ratio - 1) * 100))
print("ratio on/off, median p50:    %.3f" % (med["on"]["p50_ms"] / med["off"]["p50_ms"]))
print("ratio on/off, median p99:    %.3f" % (med["on"]["p99_ms"] / med["off"]["p99_ms"]))
print()
print("noise reference (round-to-round spread of the same configuration, req/s):")
spread = {}
for n in names:
    lo, hi = min(rps[n]), max(rps[n])
    spread[n] = (hi - lo) / med[n]["req_per_s"]
    print("  %-3s min %.0f  max %.0f  (max-min = %.1f%% of its median)" % (n, lo, hi, spread[n] * 100))
per_round = {}
for r in rows:
    per_round.setdefault(r["round"], {})[r["server"]] = float(r["req_per_s"])
paired = [v["on"] / v["off"] for _, v in sorted(per_round.items(), key=lambda kv: int(kv[0]))
          if "on" in v and "off" in v]
print("  per-round ratio on/off: %s  (median %.3f, min %.3f, max %.3f; on faster in %d of %d rounds)"
      % (" ".join("%.3f" % x for x in paired), statistics.median(paired), min(paired), max(paired),
         sum(x > 1 for x in paired), len(paired)))
# Paired view: each round runs both instances back to back, so their ratio shares that round's
# background load. The order alternates (odd rounds: on first; even rounds: off first); a
# systematic "second run of a round is faster/slower" effect cancels only when odd and even rounds
# get equal weight, which an odd BENCH_ROUNDS does not give the median. So: geometric mean of the
# odd rounds' ratios and of the even rounds' ratios, then the geometric mean of those two.
import math
gmean = lambda xs: math.exp(sum(math.log(x) for x in xs) / len(xs))
odd, even = paired[0::2], paired[1::2]
second_faster = sum((x < 1) if i % 2 == 0 else (x > 1) for i, x in enumerate(paired))
print("  run order: the second run of a round was the faster one in %d of %d rounds" % (second_faster, len(paired)))
if odd and even:
    balanced = math.sqrt(gmean(odd) * gmean(even))
    print("  position-balanced paired ratio on/off: %.3f  (%+.1f%%; geomean of on-first rounds %.3f,"
          " of off-first rounds %.3f)" % (balanced, (balanced - 1) * 100, gmean(odd), gmean(even)))
noise = min(spread.values())
verdict = "WITHIN NOISE" if abs(ratio - 1) <= noise else "OUTSIDE NOISE"
print("verdict: |ratio - 1| = %.1f%% vs smaller spread %.1f%% -> %s"
      % (abs(ratio - 1) * 100, noise * 100, verdict))

print()
print("end-to-end count check (%s):" % 'ragpool_http_requests_total{route="health",status="200"}')
runs, conns = int(runs), int(conns)
if on_metrics != "true":
    good = on_after == "0"
    print("  on : A/A control (metrics = false): /metrics after the runs = %s (wrk counted %s; expected 0) -> %s"
          % (on_after, wrk_on, "OK" if good else "UNEXPECTED"))
elif not (on_before.isdigit() and on_after.isdigit()):
    good = False
    print("  on : /metrics unavailable (before=%s after=%s) -> MISMATCH" % (on_before, on_after))
else:
    before, after, wrk = int(on_before), int(on_after), int(wrk_on)
    expected = before + wrk
    diff = after - expected
    # wrk stops each run with up to one request in flight per connection: the server may have
    # answered (and counted) it without wrk counting it. So 0 <= diff <= runs * connections.
    good = after > 0 and 0 <= diff <= runs * conns
    print("  on : /metrics after the runs = %d; wrk counted %d (warm-up + %d rounds) + %d readiness"
          " probes before warm-up = %d; difference %+d (allowed 0..%d, in-flight at wrk's stop) -> %s"
          % (after, wrk, runs - 1, before, expected, diff, runs * conns, "OK" if good else "MISMATCH"))
ok &= good
if exact_after != "skipped":
    if on_metrics != "true":
        good = exact_after == "0"
        print("  on , exact: %s requests read, counter %s (expected 0) -> %s"
              % (exact_ok, exact_after, "OK" if good else "UNEXPECTED"))
    elif not (exact_after.isdigit() and on_after.isdigit() and exact_sent.isdigit() and exact_ok.isdigit()):
        good = False
        print("  on , exact: client or /metrics failed (sent=%r read=%r counter=%r) -> MISMATCH"
              % (exact_sent, exact_ok, exact_after))
    else:
        grew = int(exact_after) - int(on_after)
        good = int(exact_sent) == int(exact_ok) and grew == int(exact_ok)
        print("  on , exact: a client that reads every response sent %s GET /health over %s"
              " concurrent keep-alive connections and read %s 200s; the counter grew by %d -> %s"
              % (exact_sent, conns_exact, exact_ok, grew, "OK (exact)" if good else "MISMATCH"))
    ok &= good
good_off = off_after == "0"
print("  off: /metrics after the runs = %s (wrk counted %s requests; expected 0 with metrics = false) -> %s"
      % (off_after, wrk_off, "OK" if good_off else "UNEXPECTED"))
ok &= good_off
print("master exit status after SIGTERM: on=%s off=%s%s" % (on_rc, off_rc,
      "" if on_rc == off_rc == "0" else "  <-- expected 0"))
ok &= on_rc == off_rc == "0"
sys.exit(0 if ok else 1)
PY
STATUS=${PIPESTATUS[0]}
set -e

for name in on off; do
    if [[ -s "$OUT/$name.log" ]]; then
        log "$name wrote $(wc -l <"$OUT/$name.log") log line(s) at loglevel warn; last lines:"
        tail -n 20 "$OUT/$name.log" >&2
    fi
done
[[ "$STATUS" == 0 ]] || die "a check failed (errors, count mismatch or exit status), see the report above"
