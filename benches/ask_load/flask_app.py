"""The baseline of benches/ask_load.sh: the seed's stack, Flask under Gunicorn's sync workers,
answering POST /api/ask/stream the way ragpool does: look the question up in a SQLite FTS5 index
of the same document, then stream the answer from the same (fake) Ollama as server-sent events.
One request occupies one sync worker for the whole answer."""

import http.client
import json
import os
import sqlite3
import urllib.parse

from flask import Flask, Response, request

OLLAMA = urllib.parse.urlsplit(os.environ["FAKE_OLLAMA_URL"])
DB = os.environ.get("FLASK_DB", "/tmp/ragpool-bench-flask.sqlite3")
DOC = "# Reload\n\nSend HUP to the master to reload the workers without downtime."

app = Flask(__name__)


def connect():
    db = sqlite3.connect(DB)
    db.execute("CREATE VIRTUAL TABLE IF NOT EXISTS chunks USING fts5(text)")
    if db.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0:
        db.execute("INSERT INTO chunks(text) VALUES (?)", (DOC,))
        db.commit()
    return db


def retrieve(question):
    terms = [w for w in "".join(c if c.isalnum() else " " for c in question).split() if w]
    if not terms:
        return []
    query = " OR ".join('"%s"' % t for t in terms)
    with connect() as db:
        return [r[0] for r in db.execute(
            "SELECT text FROM chunks WHERE chunks MATCH ? ORDER BY rank LIMIT 5", (query,))]


def sse(event, data):
    return "event: %s\ndata: %s\n\n" % (event, json.dumps(data))


@app.post("/api/ask/stream")
def ask_stream():
    question = (request.get_json(silent=True) or {}).get("question", "")
    passages = retrieve(question)

    def generate():
        yield sse("sources", [{"text": p} for p in passages])
        conn = http.client.HTTPConnection(OLLAMA.hostname, OLLAMA.port, timeout=120)
        body = json.dumps({
            "model": "llama3.2",
            "stream": True,
            "messages": [
                {"role": "system", "content": "Answer from the passages.\n" + "\n".join(passages)},
                {"role": "user", "content": question},
            ],
        })
        conn.request("POST", "/api/chat", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        for line in response:
            line = line.strip()
            if not line:
                continue
            chunk = json.loads(line)
            if chunk.get("done"):
                break
            yield sse("token", {"text": chunk.get("message", {}).get("content", "")})
        conn.close()
        yield sse("done", {"mode": "generated"})

    return Response(generate(), mimetype="text/event-stream")


@app.get("/health")
def health():
    return {"status": "ok", "pid": os.getpid()}
