#!/usr/bin/env python3
"""Scores `ragpool search` output against questions.tsv: R@1, R@5, MRR@10 per language.

A question's rank is the position (1-based) of the first hit from an answer page in the list as
returned, which is what a reader of the sources sees: when results are chunks, several chunks of
one wrong page take several of the top 5 places. Usage:
score.py QUESTIONS.TSV RESULTS.JSONL LABEL
"""
import json
import statistics
import sys


def main():
    questions_path, results_path, label = sys.argv[1:4]
    rows = [l.rstrip("\n").split("\t") for l in open(questions_path, encoding="utf-8") if l.strip()]
    results = [json.loads(l) for l in open(results_path, encoding="utf-8") if l.strip()]
    assert len(rows) == len(results), f"{len(rows)} questions, {len(results)} results"
    stats = {}
    times = []
    for (lang, question, answers), result in zip(rows, results):
        assert result["question"] == question, (question, result["question"])
        answers = set(answers.split(","))
        docs = ["/".join(hit["source"].split("/")[-3:]) for hit in result.get("hits", [])]
        rank = next((i + 1 for i, d in enumerate(docs[:10]) if d in answers), None)
        s = stats.setdefault(lang, [0, 0, 0, 0.0])
        s[0] += 1
        s[1] += rank == 1
        s[2] += rank is not None and rank <= 5
        s[3] += 1.0 / rank if rank else 0.0
        times.append(result.get("retrieve_ms", 0.0))
    total = [sum(s[i] for s in stats.values()) for i in range(4)]
    times.sort()
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    for lang, s in sorted(stats.items()) + [("all", total)]:
        n = s[0]
        print(f"| {label} | {lang} | {n} | {s[1]/n:.3f} | {s[2]/n:.3f} | {s[3]/n:.3f} |")
    print(f"| {label} | retrieve ms median {statistics.median(times):.2f} p99 {p99:.2f} |", file=sys.stderr)


if __name__ == "__main__":
    main()
