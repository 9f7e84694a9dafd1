#!/usr/bin/env bash
# Load benchmark: ragpool vs. gunicorn (4 sync workers) on a trivial GET /health endpoint.
#
# Usage (from anywhere in the repo):
#   bash benches/load.sh
#
# Knobs (environment variables, all optional):
#   BENCH_DURATION=10s   wrk duration of each measured run
#   BENCH_ROUNDS=3       rounds; each round measures both servers, alternating which goes first
#   BENCH_WARMUP=2s      wrk warm-up per server before the first round (not measured)
#   BENCH_CONNECTIONS=64 wrk -c
#   BENCH_THREADS=2      wrk -t
#   BENCH_WORKERS=4      worker processes for both servers
#   BENCH_CONN_CLOSE=0   1: wrk sends "Connection: close" (one request per TCP connection)
#                        to both servers, the way gunicorn's sync worker always behaves
#   BENCH_VENV=target/bench-venv      venv holding gunicorn (created once, then reused)
#   BENCH_GUNICORN_SPEC=gunicorn==27.0.1   what pip installs into a new venv
#   BENCH_OUT=target/bench-results/<timestamp>  raw wrk outputs, server logs and results.tsv
#
# Only loopback (127.0.0.1) is used, on free ports picked at start. Every process the script
# starts is stopped by its PID on exit.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

DURATION="${BENCH_DURATION:-10s}"
ROUNDS="${BENCH_ROUNDS:-3}"
WARMUP="${BENCH_WARMUP:-2s}"
CONNECTIONS="${BENCH_CONNECTIONS:-64}"
THREADS="${BENCH_THREADS:-2}"
WORKERS="${BENCH_WORKERS:-4}"
CONN_CLOSE="${BENCH_CONN_CLOSE:-0}"
VENV="${BENCH_VENV:-$REPO/target/bench-venv}"
GUNICORN_SPEC="${BENCH_GUNICORN_SPEC:-gunicorn==27.0.1}"
OUT="${BENCH_OUT:-$REPO/target/bench-results/$(date +%Y%m%d-%H%M%S)}"
READY_TIMEOUT=20

BENCH_TAG=load.sh
# shellcheck source=benches/lib.sh
source "$REPO/benches/lib.sh"

# --- prerequisites ---------------------------------------------------------------------------
require_tools curl python3 cargo pgrep
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive integer (got '$ROUNDS')"

setup_cleanup

mkdir -p "$OUT"

# --- build ragpool -----------------------------------------------------------------------------
build_ragpool

# --- gunicorn in a venv ------------------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv $VENV"
    python3 -m venv "$VENV"
fi
WANT_VERSION=""
[[ "$GUNICORN_SPEC" == *==* ]] && WANT_VERSION="${GUNICORN_SPEC##*==}"
HAVE_VERSION="$("$VENV/bin/python" -c 'import gunicorn; print(gunicorn.__version__)' 2>/dev/null || true)"
if [[ -z "$HAVE_VERSION" || ( -n "$WANT_VERSION" && "$HAVE_VERSION" != "$WANT_VERSION" ) ]]; then
    log "pip install $GUNICORN_SPEC into $VENV"
    "$VENV/bin/pip" install --quiet "$GUNICORN_SPEC"
fi
GUNICORN_VERSION="$("$VENV/bin/python" -c 'import gunicorn; print(gunicorn.__version__)')"

# The baseline app: a plain WSGI callable answering GET /health like ragpool does.
cat >"$TMP/bench_app.py" <<'PY'
import json
import os


def application(environ, start_response):
    if environ.get("PATH_INFO") == "/health":
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            status, payload = "405 Method Not Allowed", {"error": "use GET"}
        else:
            status, payload = "200 OK", {"status": "ok", "pid": os.getpid()}
    else:
        status, payload = "404 Not Found", {"error": "not found"}
    body = json.dumps(payload, separators=(",", ":")).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
    return [body]
PY

# --- start the servers -------------------------------------------------------------------------
RAGPOOL_PORT="$(free_port)"
GUNICORN_PORT="$(free_port)"
while [[ "$GUNICORN_PORT" == "$RAGPOOL_PORT" ]]; do GUNICORN_PORT="$(free_port)"; done

cat >"$TMP/ragpool.toml" <<EOF
workers = $WORKERS
bind = ["127.0.0.1:$RAGPOOL_PORT"]
accesslog = ""
loglevel = "warn"
EOF

log "starting ragpool on 127.0.0.1:$RAGPOOL_PORT ($WORKERS workers)"
"$RAGPOOL_BIN" serve --config "$TMP/ragpool.toml" >"$OUT/ragpool.log" 2>&1 &
RAGPOOL_PID=$!
STARTED_PIDS+=("$RAGPOOL_PID")

log "starting gunicorn $GUNICORN_VERSION on 127.0.0.1:$GUNICORN_PORT ($WORKERS sync workers)"
"$VENV/bin/gunicorn" --chdir "$TMP" -w "$WORKERS" -k sync -b "127.0.0.1:$GUNICORN_PORT" \
    --log-level warning --error-logfile - bench_app:application >"$OUT/gunicorn.log" 2>&1 &
GUNICORN_PID=$!
STARTED_PIDS+=("$GUNICORN_PID")

wait_ready ragpool "$RAGPOOL_PID" "$RAGPOOL_PORT"
wait_ready gunicorn "$GUNICORN_PID" "$GUNICORN_PORT"

WRK_ARGS=(-t "$THREADS" -c "$CONNECTIONS" --latency)
if [[ "$CONN_CLOSE" == 1 ]]; then
    WRK_ARGS+=(-H "Connection: close")
fi

port_of() { if [[ "$1" == ragpool ]]; then echo "$RAGPOOL_PORT"; else echo "$GUNICORN_PORT"; fi; }
pid_of() { if [[ "$1" == ragpool ]]; then echo "$RAGPOOL_PID"; else echo "$GUNICORN_PID"; fi; }

warm_up ragpool gunicorn

# --- measured rounds ---------------------------------------------------------------------------
run_rounds ragpool gunicorn

# --- graceful stop of ragpool, checking its exit status ----------------------------------------
log "stopping ragpool (SIGTERM to master PID $RAGPOOL_PID)"
kill -TERM "$RAGPOOL_PID"
RAGPOOL_RC=0
wait "$RAGPOOL_PID" || RAGPOOL_RC=$?
log "ragpool exited with status $RAGPOOL_RC"
stop_pid "$GUNICORN_PID" 15
wait "$GUNICORN_PID" 2>/dev/null || true
STARTED_PIDS=()

# --- report ------------------------------------------------------------------------------------
HEADER="$(printf 'ragpool %s (%s workers) vs gunicorn %s (-w %s -k sync), GET /health\nwrk: %s, -t %s -c %s -d %s, %s round(s)%s\nmachine: nproc=%s, kernel %s\nraw output: %s' \
    "$("$RAGPOOL_BIN" --version 2>/dev/null | awk '{print $2}')" "$WORKERS" "$GUNICORN_VERSION" "$WORKERS" \
    "$(wrk --version 2>&1 | head -n1 | awk '{print $2}')" "$THREADS" "$CONNECTIONS" "$DURATION" "$ROUNDS" \
    "$([[ "$CONN_CLOSE" == 1 ]] && echo ', Connection: close' || true)" \
    "$(nproc)" "$(uname -r)" "$OUT")"

python3 - "$RESULTS" "$HEADER" "$RAGPOOL_RC" <<'PY' | tee "$OUT/report.txt"
import csv
import statistics
import sys

path, header, ragpool_rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = list(csv.DictReader(open(path), delimiter="\t"))
servers = ["ragpool", "gunicorn"]
metrics = ["req_per_s", "p50_ms", "p90_ms", "p99_ms"]

print(header)
print()
fmt = "| {:<8} | {:<8} | {:>10} | {:>8} | {:>8} | {:>8} | {:>10} |"
print(fmt.format("round", "server", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors"))
print("|" + "|".join("-" * (w + 2) for w in (8, 8, 10, 8, 8, 8, 10)) + "|")

def errors(r):
    n = int(r["non2xx3xx"])
    s = [int(r[k]) for k in ("sock_connect", "sock_read", "sock_write", "sock_timeout")]
    return n, s

for r in rows:
    n, s = errors(r)
    print(fmt.format(r["round"], r["server"], "%.0f" % float(r["req_per_s"]),
                     "%.3f" % float(r["p50_ms"]), "%.3f" % float(r["p90_ms"]),
                     "%.3f" % float(r["p99_ms"]), n + sum(s)))

med = {}
for srv in servers:
    sel = [r for r in rows if r["server"] == srv]
    med[srv] = {m: statistics.median(float(r[m]) for r in sel) for m in metrics}
    tot_n = sum(errors(r)[0] for r in sel)
    tot_s = sum(sum(errors(r)[1]) for r in sel)
    print(fmt.format("median", srv, "%.0f" % med[srv]["req_per_s"], "%.3f" % med[srv]["p50_ms"],
                     "%.3f" % med[srv]["p90_ms"], "%.3f" % med[srv]["p99_ms"], tot_n + tot_s))

print()
print("ratio ragpool/gunicorn, median req/s:   %.2fx" % (med["ragpool"]["req_per_s"] / med["gunicorn"]["req_per_s"]))
print("ratio ragpool/gunicorn, median p99 lat: %.3f  (lower is better for ragpool)"
      % (med["ragpool"]["p99_ms"] / med["gunicorn"]["p99_ms"]))
print()
print("errors reported by wrk (summed over rounds):")
for srv in servers:
    sel = [r for r in rows if r["server"] == srv]
    tot = lambda k: sum(int(r[k]) for r in sel)
    print("  %-8s requests=%d non-2xx/3xx=%d socket errors: connect=%d read=%d write=%d timeout=%d"
          % (srv, tot("requests"), tot("non2xx3xx"), tot("sock_connect"), tot("sock_read"),
             tot("sock_write"), tot("sock_timeout")))
print("ragpool master exit status after SIGTERM: %d%s" % (ragpool_rc, "" if ragpool_rc == 0 else "  <-- expected 0"))
PY

if [[ -s "$OUT/ragpool.log" ]]; then
    log "ragpool wrote $(wc -l <"$OUT/ragpool.log") log line(s) at loglevel warn; last lines:"
    tail -n 20 "$OUT/ragpool.log" >&2
fi
[[ "$RAGPOOL_RC" == 0 ]] || die "ragpool exited with status $RAGPOOL_RC after SIGTERM (expected 0)"
