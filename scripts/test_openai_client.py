#!/usr/bin/env python3
"""Checks `pocketlm serve` with the official `openai` Python client as a real client.

Setup (versions used: Python 3.11.7, openai 3.54.0 with pydantic 2.14.3):
    python3 -m venv /root/venv-server && /root/venv-server/bin/pip install openai==3.54.0
Run: start a server, e.g. `pocketlm serve --port 8080 --api-key sk-local`, then
    /root/venv-server/bin/python scripts/test_openai_client.py --base-url http://127.0.0.1:8080/v1 --api-key sk-local
The Rust test `crates/pocketlm-server/tests/it/openai_client.rs` does all of this by itself
(venv under the target dir, server on a free loopback port) and also runs scripts/test_curl.sh.
Exits non-zero on the first failed check. Checks: model list; non-streamed and streamed chat
completions (content, finish_reason, usage counts, stream == non-stream for greedy decoding);
stop strings; text completions; log-probabilities (chat `logprobs`/`top_logprobs`, streamed
and not, and legacy completion `logprobs`); `n` choices; 400/401 errors (an out-of-range `n`,
an unknown field) surfacing as the client's exception types; with `--embedding-model ID` (a
server started with `--embedding-model`), `embeddings.create` (the client's default base64
encoding and `float`, unit-length vectors, similar texts closer, usage, `dimensions` refused
for a model without Matryoshka training).
"""

import argparse
import math
import sys

import openai


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}")
        sys.exit(1)
    print(f"ok: {what}")


def check_top(entries, k, greedy):
    """Each entry has k alternatives, sorted, the chosen token first when decoding greedily."""
    for e in entries:
        check_quiet(e.logprob <= 0 and len(e.top_logprobs) == k, f"{k} alternatives, logprob <= 0: {e}")
        tops = [t.logprob for t in e.top_logprobs]
        check_quiet(tops == sorted(tops, reverse=True), f"top_logprobs sorted: {tops}")
        check_quiet(sum(math.exp(t) for t in tops) <= 1 + 1e-4, "alternatives hold at most all the mass")
        check_quiet(e.bytes is not None and bytes(e.bytes).decode("utf-8", "replace") == e.token
                    or "\ufffd" in e.token, f"bytes spell the token: {e}")
        if greedy and k:
            check_quiet(e.top_logprobs[0].token == e.token and abs(e.top_logprobs[0].logprob - e.logprob) < 1e-6,
                        f"greedy token is the most likely: {e}")


def check_quiet(cond, what):
    if not cond:
        print(f"FAIL: {what}")
        sys.exit(1)


def check_logprobs(client, model, messages):
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    check(len(content) == r.usage.completion_tokens, f"chat logprobs: one entry per token ({len(content)})")
    check_top(content, 3, greedy=True)
    joined = b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace")
    check(joined == r.choices[0].message.content, f"chat logprobs bytes spell the answer {joined!r}")
    print("ok: chat logprobs entries sorted, greedy token first")

    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed = []
    for chunk in stream:
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.content:
                streamed.extend(c.logprobs.content)
    check_top(streamed, 3, greedy=True)
    ok = len(streamed) == len(content) and all(
        a.token == b.token and abs(a.logprob - b.logprob) < 1e-5 for a, b in zip(streamed, content))
    check(ok, f"streamed chat logprobs equal non-streamed ({len(streamed)} tokens)")

    # Temperature changes the draw, not the reported distribution (raw logits).
    hot = client.chat.completions.create(model=model, messages=messages, max_tokens=1, temperature=1.8, seed=5,
                                         logprobs=True, top_logprobs=3)
    h = hot.choices[0].logprobs.content[0]
    check_top([h], 3, greedy=False)
    check([(t.token, round(t.logprob, 4)) for t in h.top_logprobs]
          == [(t.token, round(t.logprob, 4)) for t in content[0].top_logprobs],
          "logprobs are those of the raw logits, whatever the temperature")

    prompt = "One, two, three,"
    c = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    n = c.usage.completion_tokens
    check(len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n,
          f"legacy logprobs lists of {n} tokens")
    check("".join(lp.tokens) == c.choices[0].text, f"legacy tokens spell the text {lp.tokens}")
    offsets, at = [], 0
    for t in lp.tokens:
        offsets.append(at)
        at += len(t)
    check(lp.text_offset == offsets, f"text_offset {lp.text_offset}")
    for t, l, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        check_quiet(2 <= len(top) <= 3 and abs(top[t] - l) < 1e-6 and max(top.values()) == l,
                    f"legacy top_logprobs {top} hold the greedy token {t!r} ({l})")
    print("ok: legacy top_logprobs hold the chosen (most likely) token")
    try:
        client.chat.completions.create(model=model, messages=messages, logprobs=True, top_logprobs=21)
        check(False, "top_logprobs=21 refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and e.body.get("param") == "top_logprobs", "top_logprobs=21 -> 400")


def check_embeddings(client, model):
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "A monkey is playing drums."]
    r = client.embeddings.create(model=model, input=texts)  # the client asks for base64
    vecs = [d.embedding for d in r.data]
    check(r.object == "list" and [d.index for d in r.data] == [0, 1, 2], "embeddings: three in order")
    check(all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vecs), f"unit vectors of {len(vecs[0])}")
    f = client.embeddings.create(model=model, input=texts, encoding_format="float")
    check(all(max(abs(a - b) for a, b in zip(u, v)) < 1e-6 for u, v in zip(vecs, (d.embedding for d in f.data))),
          "base64 equals float")
    cos = lambda u, v: sum(a * b for a, b in zip(u, v))
    check(cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2]), f"eating/eating {cos(vecs[0], vecs[1]):.3f} > "
          f"eating/drums {cos(vecs[0], vecs[2]):.3f}")
    check(r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens, f"embedding usage {r.usage}")
    try:
        client.embeddings.create(model=model, input="x", dimensions=8)
        check(False, "dimensions=8 refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and e.body.get("param") == "dimensions", "dimensions=8 -> 400")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default="sk-local")
    ap.add_argument("--embedding-model", help="the id of the server's embedding model, to check /v1/embeddings")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120)

    models = client.models.list()
    ids = [m.id for m in models.data]
    # The chat model first, then the embedding model when the server has one.
    expected = 2 if args.embedding_model else 1
    check(len(ids) == expected, f"{expected} model(s) listed: {ids}")
    if args.embedding_model:
        check(ids[1] == args.embedding_model, f"embedding model listed second: {ids}")
    model = ids[0]

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, seed=1)
    text = r.choices[0].message.content
    check(r.object == "chat.completion" and bool(text.strip()), f"chat completion content {text!r}")
    check(r.choices[0].finish_reason in ("stop", "length"), f"finish_reason {r.choices[0].finish_reason}")
    u = r.usage
    check(
        u.prompt_tokens > 0 and 0 < u.completion_tokens <= 8 and u.total_tokens == u.prompt_tokens + u.completion_tokens,
        f"usage {u}",
    )
    if r.choices[0].finish_reason == "length":
        check(u.completion_tokens == 8, "length means max_tokens tokens")

    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    parts, finish, susage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            susage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                parts.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    check("".join(parts) == text, f"streamed text equals non-streamed ({len(parts)} chunks)")
    check(finish == r.choices[0].finish_reason, f"streamed finish_reason {finish}")
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    check(
        susage is not None
        and all(getattr(susage, k) == getattr(u, k) for k in counts)
        # The second run of the same prompt reuses its cached prefix (pocketlm's prefix
        # cache; a server without one reports no details).
        and (
            susage.prompt_tokens_details is None
            if u.prompt_tokens_details is None
            else 0 < susage.prompt_tokens_details.cached_tokens < susage.prompt_tokens
        ),
        f"streamed usage {susage}",
    )

    # Stop strings: cut the greedy answer at a piece of its second half.
    full = client.completions.create(model=model, prompt="The days of the week are Monday, Tuesday,", max_tokens=8, temperature=0)
    ftext = full.choices[0].text
    check(len(ftext) >= 4, f"completion text {ftext!r}")
    stop = ftext[len(ftext) // 2:][:2]
    cut = client.completions.create(
        model=model, prompt="The days of the week are Monday, Tuesday,", max_tokens=8, temperature=0,
        stop=["never-produced-xyz", stop],
    )
    check(cut.choices[0].text == ftext[: ftext.index(stop)], f"stop {stop!r}: {cut.choices[0].text!r}")
    check(cut.choices[0].finish_reason == "stop", "finish_reason stop after a stop string")
    chat_stop = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, stop=text[2:4])
    check(chat_stop.choices[0].message.content == text[: text.index(text[2:4])], f"chat stop {text[2:4]!r}")

    check_logprobs(client, model, messages)
    if args.embedding_model:
        check_embeddings(client, args.embedding_model)

    r = client.chat.completions.create(model=model, messages=messages, n=2, max_tokens=3, seed=3)
    check([c.index for c in r.choices] == [0, 1], "n=2 gives two choices")
    try:
        client.chat.completions.create(model=model, messages=messages, n=17)
        check(False, "n=17 refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and e.body.get("param") == "n", f"n=17 -> 400 ({e.body.get('message')})")
    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=1, extra_body={"no_such_field": 1})
        check(False, "an unknown field refused")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "no_such_field", "unknown field -> 400 naming it")
    bad = openai.OpenAI(base_url=args.base_url, api_key="wrong-key", max_retries=0, timeout=120)
    try:
        bad.models.list()
        check(False, "wrong key refused")
    except openai.AuthenticationError as e:
        check(e.status_code == 401, "wrong key -> 401 AuthenticationError")
    print("all checks passed")


if __name__ == "__main__":
    main()
