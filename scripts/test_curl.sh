#!/usr/bin/env bash
# Checks `pocketlm serve` with plain curl (what a user types), parsing answers with python3.
#
# Run: start a server, e.g. `pocketlm serve --port 8080 --api-key sk-local`, then
#   scripts/test_curl.sh http://127.0.0.1:8080 sk-local
# Needs curl and python3 (standard library only). Exits non-zero on the first failed check.
# Checks: /health; /v1/models; a non-streamed chat completion (content, usage); a streamed one
# with `curl -N` (role chunk first, content, usage chunk, `data: [DONE]` last); a completion
# with legacy logprobs; 401 without the key, 400 on malformed JSON, 404 on an unknown route,
# each with OpenAI's error shape.
set -euo pipefail

BASE="${1:-http://127.0.0.1:8080}"
KEY="${2:-}"
AUTH=()
if [[ -n "$KEY" ]]; then
  AUTH=(-H "Authorization: Bearer $KEY")
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }

# req NAME EXPECTED_STATUS CURL_ARGS...: writes the body to $TMP/NAME, checks the status.
req() {
  local name="$1" want="$2"
  shift 2
  local got
  got="$(curl -sS --max-time 120 -o "$TMP/$name" -w '%{http_code}' "$@")" || fail "curl $name"
  [[ "$got" == "$want" ]] || fail "$name: HTTP $got, expected $want: $(head -c 300 "$TMP/$name")"
}

# py FILE CODE: runs CODE with `body` (the parsed JSON of FILE) in scope.
py() {
  python3 - "$1" "$2" <<'EOF'
import json, sys
text = open(sys.argv[1], encoding="utf-8").read()
body = json.loads(text) if not text.startswith("data:") else None
exec(sys.argv[2])
EOF
}

req health 200 "$BASE/health"
py "$TMP/health" 'assert body["status"] == "ok" and {"running", "waiting", "kv_bytes", "kv_peak_bytes", "kv_budget_bytes", "preemptions"} <= set(body["engine"]), body' || fail "health body"
ok "GET /health"

req models 200 "${AUTH[@]}" "$BASE/v1/models"
py "$TMP/models" 'assert body["object"] == "list" and 1 <= len(body["data"]) <= 2 and all(m["object"] == "model" for m in body["data"]), body' || fail "models"
ok "GET /v1/models"

CHAT='{"messages":[{"role":"user","content":"Say hello."}],"max_tokens":6,"temperature":0}'
req chat 200 "${AUTH[@]}" -H 'Content-Type: application/json' -d "$CHAT" "$BASE/v1/chat/completions"
py "$TMP/chat" '
c = body["choices"][0]
u = body["usage"]
assert body["object"] == "chat.completion" and c["message"]["content"].strip(), body
assert c["finish_reason"] in ("stop", "length"), body
assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and 0 < u["completion_tokens"] <= 6, u
open(sys.argv[1] + ".text", "w", encoding="utf-8").write(c["message"]["content"])
' || fail "chat body"
ok "POST /v1/chat/completions"

SCHAT='{"messages":[{"role":"user","content":"Say hello."}],"max_tokens":6,"temperature":0,"stream":true,"stream_options":{"include_usage":true}}'
req stream 200 -N "${AUTH[@]}" -H 'Content-Type: application/json' -d "$SCHAT" "$BASE/v1/chat/completions"
py "$TMP/stream" '
events = [e for e in text.split("\n\n") if e.strip()]
assert all(e.startswith("data: ") for e in events), events
assert events[-1] == "data: [DONE]", events[-1]
chunks = [json.loads(e[6:]) for e in events[:-1]]
assert chunks[0]["choices"][0]["delta"]["role"] == "assistant", chunks[0]
streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
expected = open(sys.argv[1].replace("stream", "chat") + ".text", encoding="utf-8").read()
assert streamed == expected, (streamed, expected)
assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0, chunks[-1]
' || fail "stream body"
ok "POST /v1/chat/completions (stream, curl -N)"

COMP='{"prompt":"One, two, three,","max_tokens":4,"temperature":0,"logprobs":2}'
req comp 200 "${AUTH[@]}" -H 'Content-Type: application/json' -d "$COMP" "$BASE/v1/completions"
py "$TMP/comp" '
c = body["choices"][0]
lp = c["logprobs"]
assert "".join(lp["tokens"]) == c["text"], body
assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == body["usage"]["completion_tokens"], body
assert all(t in top for t, top in zip(lp["tokens"], lp["top_logprobs"])), body
' || fail "completion body"
ok "POST /v1/completions with logprobs"

ERR='e = body["error"]; assert e["message"] and e["type"] and "param" in e and "code" in e, body'
if [[ -n "$KEY" ]]; then
  req noauth 401 -H 'Content-Type: application/json' -d "$CHAT" "$BASE/v1/chat/completions"
  py "$TMP/noauth" "$ERR" || fail "401 body"
  ok "401 without the key"
fi
req badjson 400 "${AUTH[@]}" -H 'Content-Type: application/json' -d '{"messages": [' "$BASE/v1/chat/completions"
py "$TMP/badjson" "$ERR" || fail "400 body"
ok "400 on malformed JSON"
req unknown 404 "${AUTH[@]}" "$BASE/v1/nothing-here"
py "$TMP/unknown" "$ERR" || fail "404 body"
ok "404 on an unknown route"
echo "all curl checks passed"
