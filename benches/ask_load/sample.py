"""Sampler of benches/ask_load.sh: every INTERVAL seconds, for each worker of the master PID,
its threads (/proc/PID/status), RSS and PSS (/proc/PID/smaps_rollup), and the master's too;
with a ragpool PORT also /status's per-worker connections. One TSV line per process per
sample, tagged with the current phase (the first line of PHASE_FILE). Stops when PHASE_FILE
says "stop" or after MAX_SECONDS."""

import json
import os
import sys
import time
import urllib.request

master, port, phase_file, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
INTERVAL, MAX_SECONDS = 0.25, 3600


def children(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open("/proc/%s/stat" % entry).read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(entry))
    return sorted(kids)


def field(path, name):
    try:
        for line in open(path):
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def connections():
    if port == "-":
        return {}
    try:
        with urllib.request.urlopen("http://127.0.0.1:%s/status" % port, timeout=2) as r:
            status = json.load(r)
        return {w["pid"]: w["connections"] for w in status["workers"]}
    except Exception:
        return {}


started = time.time()
with open(out, "a") as f:
    while time.time() - started < MAX_SECONDS:
        try:
            phase = open(phase_file).read().strip() or "none"
        except OSError:
            phase = "none"
        if phase == "stop":
            break
        now = time.time() - started
        conns = connections()
        for pid, role in [(master, "master")] + [(p, "worker") for p in children(master)]:
            threads = field("/proc/%d/status" % pid, "Threads")
            rss = field("/proc/%d/smaps_rollup" % pid, "Rss")
            pss = field("/proc/%d/smaps_rollup" % pid, "Pss")
            if threads is None:
                continue
            f.write("%.2f\t%s\t%d\t%s\t%d\t%d\t%d\t%s\n" % (
                now, phase, pid, role, threads, rss or 0, pss or 0,
                conns.get(pid, "") if role == "worker" else ""))
        f.flush()
        time.sleep(INTERVAL)
