"""Report of benches/ask_load.sh: medians per server and level from results.tsv, and from the
samples: threads per worker (max), RSS/PSS of master + workers (idle, peak, after), and the
per-worker connection spread at each level's busiest sample."""

import collections
import csv
import statistics
import sys

out, workers, nproc, kernel, malloc = sys.argv[1:6]
rows = list(csv.DictReader(open(out + "/results.tsv"), delimiter="\t"))


def med(server, c, key):
    vals = [float(r[key]) for r in rows if r["server"] == server and r["c"] == str(c)]
    return statistics.median(vals) if vals else float("nan")


def total_errors(server, c):
    return sum(int(r["errors"]) for r in rows if r["server"] == server and r["c"] == str(c))


def samples(name):
    by_time = collections.defaultdict(list)
    try:
        for line in open("%s/samples.tsv.%s" % (out, name)):
            t, phase, pid, role, threads, rss, pss, conns = line.rstrip("\n").split("\t")
            by_time[(float(t), phase)].append(
                (int(pid), role, int(threads), int(rss), int(pss), int(conns) if conns else None))
    except OSError:
        pass
    return sorted(by_time.items())


def memory(name):
    s = samples(name)
    totals = [(phase, sum(p[3] for p in procs), sum(p[4] for p in procs)) for (t, phase), procs in s]
    idle = [x for x in totals if x[0] == "idle"]
    after = [x for x in totals if x[0] == "after"]
    peak = max(totals, key=lambda x: x[2]) if totals else None
    mib = lambda kib: kib / 1024
    res = {}
    if idle:
        res["idle"] = (mib(statistics.median(x[1] for x in idle)), mib(statistics.median(x[2] for x in idle)))
    if peak:
        res["peak"] = (mib(max(x[1] for x in totals)), mib(peak[2]))
    if after:
        res["after"] = (mib(after[-1][1]), mib(after[-1][2]))
    threads = max((p[2] for _, procs in s for p in procs if p[1] == "worker"), default=0)
    return res, threads


def spread(name, phase):
    best = None
    for (t, ph), procs in samples(name):
        if ph != phase:
            continue
        conns = [p[5] for p in procs if p[1] == "worker" and p[5] is not None]
        if len(conns) and (best is None or sum(conns) > sum(best)):
            best = conns
    if not best:
        return "-"
    mean = sum(best) / len(best)
    dev = max(abs(c - mean) for c in best) / mean * 100 if mean else 0
    return "%s (mean %.0f, max dev %.0f%%)" % ("/".join(str(c) for c in sorted(best)), mean, dev)


levels = sorted({int(r["c"]) for r in rows if r["server"] == "ragpool"})
print("ask_load: %s workers, nproc=%s, kernel %s, ragpool allocator: %s; raw: %s" % (workers, nproc, kernel, malloc, out))
print()
print("| c | fake alone p50 / p99 s | ragpool answers/s | ragpool p50 / p99 s | p99 ragpool/fake | errors | connections per worker at the peak |")
print("|---|---|---|---|---|---|---|")
for c in levels:
    fp50, fp99 = med("fake", c, "p50_ms") / 1000, med("fake", c, "p99_ms") / 1000
    rp50, rp99 = med("ragpool", c, "p50_ms") / 1000, med("ragpool", c, "p99_ms") / 1000
    print("| %d | %.2f / %.2f | %.1f | %.2f / %.2f | %.3f | %d | %s |" % (
        c, fp50, fp99, med("ragpool", c, "answers_per_s"), rp50, rp99, rp99 / fp99,
        total_errors("ragpool", c), spread("ragpool", "c%d" % c)))
if any(r["server"] == "ragpool-reuseport" for r in rows):
    print("| 1000, reuse_port | | %.1f | %.2f / %.2f | %.3f | %d | %s |" % (
        med("ragpool-reuseport", 1000, "answers_per_s"), med("ragpool-reuseport", 1000, "p50_ms") / 1000,
        med("ragpool-reuseport", 1000, "p99_ms") / 1000,
        med("ragpool-reuseport", 1000, "p99_ms") / med("fake", 1000, "p99_ms"),
        total_errors("ragpool-reuseport", 1000), spread("reuseport", "c1000")))
gu = [r for r in rows if r["server"] == "gunicorn"]
if gu:
    c = int(gu[0]["c"])
    fake_g = [r for r in rows if r["server"] == "fake" and r["round"] == "g"]
    print()
    print("Gunicorn %s sync workers + Flask at c=%d: %.2f answers/s, p50 %.2f s, p99 %.2f s, errors %d "
          "(the fake alone at c=%d: p99 %.2f s)" % (
              workers, c, float(gu[0]["answers_per_s"]), float(gu[0]["p50_ms"]) / 1000,
              float(gu[0]["p99_ms"]) / 1000, int(gu[0]["errors"]), c,
              float(fake_g[0]["p99_ms"]) / 1000 if fake_g else float("nan")))
    if c in levels:
        print("ratio ragpool/Gunicorn at c=%d: answers/s %.1fx, p50 %.3f" % (
            c, med("ragpool", c, "answers_per_s") / float(gu[0]["answers_per_s"]),
            med("ragpool", c, "p50_ms") / float(gu[0]["p50_ms"])))
print()
for name, label in [("ragpool", "ragpool (master + workers)"), ("reuseport", "ragpool reuse_port"),
                    ("gunicorn", "Gunicorn (master + workers)")]:
    mem, threads = memory(name)
    if not mem:
        continue
    parts = ["%s RSS %.0f / PSS %.0f MiB" % (k, *mem[k]) for k in ("idle", "peak", "after") if k in mem]
    ratio = ""
    if "idle" in mem and "after" in mem:
        ratio = "; after/idle PSS %.2fx" % (mem["after"][1] / mem["idle"][1])
    print("%s: %s; max threads per worker %d%s" % (label, ", ".join(parts), threads, ratio))
