-- wrk script of benches/ask_load.sh: every request is the same POST with a JSON body, to
-- WRK_PATH (ragpool/Gunicorn: /api/ask/stream; the fake Ollama alone: /api/chat).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local path = os.getenv("WRK_PATH") or "/api/ask/stream"
if path == "/api/chat" then
  wrk.body = '{"model":"llama3.2","stream":true,"messages":[{"role":"user","content":"how do I reload the workers?"}]}'
else
  wrk.body = '{"question":"how do I reload the workers?"}'
end
wrk.path = path
request = function()
  return wrk.format(nil, path)
end
