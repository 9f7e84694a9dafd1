#!/usr/bin/env python3
"""Builds the bilingual retrieval dev set from the installed Debian man pages.

Corpus: every Russian page of `manpages-ru` (/usr/share/man/ru/man*/) and, in English, every
page of `manpages` plus the English original of each Russian page where one is installed, so
translations sit next to their originals as in a bilingual organisation. Each page is rendered
with groff and written as Markdown: `# name(section)`, then one `## HEADING` per man section.

Questions are mechanical: a page's NAME line "ls - list directory contents" gives the question
"list directory contents", whose answer is that page. The NAME section is left out of the
ingested text, so the question is not a verbatim line of its answer. A summary shared by two
pages of one language is ambiguous and dropped; a "Russian" summary without Cyrillic is dropped.

Usage: build.py OUT_DIR   (writes OUT_DIR/corpus/{en,ru}/..., OUT_DIR/questions.tsv, and
prints a manifest: counts and a sha256 of the questions, to compare with MANIFEST).
"""
import gzip
import hashlib
import os
import re
import subprocess
import sys

MAN = "/usr/share/man"
NAME_HEADINGS = {"NAME", "ИМЯ", "НАЗВАНИЕ", "НАИМЕНОВАНИЕ"}
SUMMARY_SPLIT = re.compile(r"\s+[-\u2212\u2014\u2013]\s+")


def dpkg_files(package):
    out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True)
    return [p for p in out.stdout.split() if p.endswith(".gz") and "/man/" in p]


def render(path):
    """groff's text of one page, or None for a `.so` link or a page groff cannot render."""
    with gzip.open(path, "rb") as f:
        source = f.read()
    if source.lstrip().startswith(b".so "):
        return None
    env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8")
    pre = subprocess.run(["preconv", "-e", "UTF-8"], input=source, capture_output=True, env=env)
    out = subprocess.run(["groff", "-man", "-Tutf8", "-P-cbou", "-rLL=80n", "-rHY=0"],
                         input=pre.stdout, capture_output=True, env=env)
    text = out.stdout.decode("utf-8", "replace")
    return text if text.strip() else None


def sections(text):
    """[(heading, body lines)] from groff's output (header and footer lines dropped)."""
    lines = text.splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    lines = lines[1:]  # running header "LS(1)  User Commands  LS(1)"
    while lines and not lines[-1].strip():
        lines.pop()
    lines = lines[:-1]  # running footer
    out = []
    for line in lines:
        if line and not line[0].isspace():
            out.append((line.strip(), []))
        elif out:
            out[-1][1].append(line[7:] if line.startswith(" " * 7) else line.strip())
    return out


def summary(body):
    text = " ".join(l.strip() for l in body if l.strip())
    parts = SUMMARY_SPLIT.split(text, maxsplit=1)
    return " ".join(parts[1].split()) if len(parts) == 2 else None


def page_name(path):
    base = os.path.basename(path)[: -len(".gz")]
    name, _, section = base.rpartition(".")
    return name, section


def convert(path, lang, out_dir, seen):
    text = render(path)
    if text is None:
        return None
    body_digest = hashlib.sha256("\n".join(text.splitlines()[1:-1]).encode()).hexdigest()
    if body_digest in seen:
        return None
    seen.add(body_digest)
    secs = sections(text)
    if not secs:
        return None
    name, section = page_name(path)
    question = None
    parts = [f"# {name}({section})\n"]
    for heading, body in secs:
        if heading.upper() in NAME_HEADINGS:
            question = question or summary(body)
            continue
        body_text = "\n".join(body).strip()
        body_text = re.sub(r"\n{3,}", "\n\n", body_text)
        parts.append(f"## {heading}\n\n{body_text}\n")
    rel = os.path.join(lang, os.path.basename(os.path.dirname(path)), f"{name}.{section}.md")
    dest = os.path.join(out_dir, "corpus", rel)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return rel, question


def main():
    out_dir = sys.argv[1]
    russian = sorted(p for p in dpkg_files("manpages-ru"))
    english = set(dpkg_files("manpages"))
    for path in russian:
        original = os.path.join(MAN, os.path.relpath(path, os.path.join(MAN, "ru")))
        if os.path.exists(original):
            english.add(original)
    questions = {"en": {}, "ru": {}}
    docs = {"en": 0, "ru": 0}
    seen = set()
    for lang, paths in (("ru", russian), ("en", sorted(english))):
        for path in paths:
            converted = convert(path, lang, out_dir, seen)
            if converted is None:
                continue
            rel, question = converted
            docs[lang] += 1
            if not question or (lang == "ru" and not re.search("[а-яё]", question, re.I)):
                continue
            key = question.lower()
            questions[lang].setdefault(key, []).append((question, rel))
    rows = []
    for lang in ("en", "ru"):
        for key in sorted(questions[lang]):
            found = questions[lang][key]
            rows.append((lang, found[0][0], ",".join(sorted(rel for _, rel in found))))
    with open(os.path.join(out_dir, "questions.tsv"), "w", encoding="utf-8") as f:
        for lang, question, rel in rows:
            f.write(f"{lang}\t{question}\t{rel}\n")
    digest = hashlib.sha256("".join(f"{l}\t{q}\t{r}\n" for l, q, r in rows).encode()).hexdigest()
    count = {l: sum(1 for r in rows if r[0] == l) for l in ("en", "ru")}
    print(f"documents en={docs['en']} ru={docs['ru']}")
    print(f"questions en={count['en']} ru={count['ru']}")
    print(f"questions.tsv sha256 {digest}")


if __name__ == "__main__":
    main()
