#!/usr/bin/env python3
"""A smaller dev set for dense and hybrid runs, whose embedding of the whole corpus takes too
long on a small machine: the first N Russian pages (by path) that have an English original,
both languages of each, and the questions whose answers are among them. Mechanical like
build.py, so a table says which N it used.

Usage: subset.py DEVSET OUT_DIR N
"""
import os
import shutil
import sys


def main():
    devset, out_dir, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    corpus = os.path.join(devset, "corpus")
    pairs = []
    for root, _, files in sorted(os.walk(os.path.join(corpus, "ru"))):
        for name in sorted(files):
            ru = os.path.relpath(os.path.join(root, name), corpus)
            en = "en" + ru[2:]
            if os.path.exists(os.path.join(corpus, en)):
                pairs.append((ru, en))
    keep = {rel for pair in sorted(pairs)[:n] for rel in pair}
    for rel in keep:
        dest = os.path.join(out_dir, "corpus", rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(os.path.join(corpus, rel), dest)
    count = {"en": 0, "ru": 0}
    with open(os.path.join(devset, "questions.tsv"), encoding="utf-8") as f, \
            open(os.path.join(out_dir, "questions.tsv"), "w", encoding="utf-8") as out:
        for line in f:
            lang, _, answers = line.rstrip("\n").split("\t")
            if any(a in keep for a in answers.split(",")):
                out.write(line)
                count[lang] += 1
    print(f"subset pairs={len(keep) // 2} questions en={count['en']} ru={count['ru']}")


if __name__ == "__main__":
    main()
