"""The real `openai` Python client against ragpool's /v1 (run by tests/it/conversation.rs).

Reads RAGPOOL_URL (".../v1"), RAGPOOL_KEY, FIRST and FOLLOW_UP from the environment; prints one
JSON object with what the client saw. Exit 3 when the openai package is missing.
"""
import json
import os
import sys

try:
    import openai
except ImportError:
    print("openai is not installed", file=sys.stderr)
    sys.exit(3)

base_url = os.environ["RAGPOOL_URL"]
client = openai.OpenAI(base_url=base_url, api_key=os.environ["RAGPOOL_KEY"], max_retries=0, timeout=60)
messages = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": os.environ["FIRST"]},
]

out = {"version": openai.__version__}
out["models"] = [m.id for m in client.models.list()]

first = client.chat.completions.create(model="ragpool", messages=messages)
out["first"] = {
    "object": first.object,
    "content": first.choices[0].message.content,
    "role": first.choices[0].message.role,
    "finish_reason": first.choices[0].finish_reason,
    # Fields outside OpenAI's schema are kept by the client, not validated.
    "sources": (first.model_extra or {}).get("sources"),
}

messages += [
    {"role": "assistant", "content": first.choices[0].message.content},
    {"role": "user", "content": os.environ["FOLLOW_UP"]},
]
text, finish, sources, chunks, ids = "", None, None, 0, set()
for chunk in client.chat.completions.create(model="ragpool", messages=messages, stream=True):
    chunks += 1
    ids.add(chunk.id)
    extra = chunk.model_extra or {}
    if "sources" in extra:
        sources = extra["sources"]
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
out["follow_up"] = {"content": text, "finish_reason": finish, "sources": sources,
                    "chunks": chunks, "ids": len(ids)}

try:
    openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
    out["wrong_key"] = "accepted"
except openai.AuthenticationError as e:
    out["wrong_key"] = e.status_code

try:
    client.chat.completions.create(model="gpt-4o", messages=messages)
    out["wrong_model"] = "accepted"
except openai.NotFoundError as e:
    out["wrong_model"] = e.status_code

print(json.dumps(out))
