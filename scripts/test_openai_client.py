#!/usr/bin/env python3
"""Checks `pocketlm serve` with the official `openai` Python client as a real client.

Setup (versions used): python3 -m venv /root/venv-server &&
    /root/venv-server/bin/pip install openai==3.54.0
Run: start a server, e.g. `pocketlm serve --port 8080 --api-key sk-local`, then
    /root/venv-server/bin/python scripts/test_openai_client.py --base-url http://127.0.0.1:8080/v1 --api-key sk-local
Exits non-zero on the first failed check. Checks: model list; non-streamed and streamed chat
completions (content, finish_reason, usage counts, stream == non-stream for greedy decoding);
stop strings; text completions; 400/401 errors surfacing as the client's exception types.
"""

import argparse
import sys

import openai


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}")
        sys.exit(1)
    print(f"ok: {what}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default="sk-local")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)

    models = client.models.list()
    ids = [m.id for m in models.data]
    check(len(ids) == 1, f"one model listed: {ids}")
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
    check(susage is not None and susage.model_dump() == u.model_dump(), f"streamed usage {susage}")

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

    try:
        client.chat.completions.create(model=model, messages=messages, n=2)
        check(False, "n=2 refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and e.body.get("param") == "n", f"n=2 -> 400 ({e.body.get('message')})")
    bad = openai.OpenAI(base_url=args.base_url, api_key="wrong-key", max_retries=0)
    try:
        bad.models.list()
        check(False, "wrong key refused")
    except openai.AuthenticationError as e:
        check(e.status_code == 401, "wrong key -> 401 AuthenticationError")
    print("all checks passed")


if __name__ == "__main__":
    main()
