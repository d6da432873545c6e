#!/usr/bin/env python3
"""Bounded load test of `pocketlm serve` on loopback (standard library only, no pip package).

N client threads (default 64) share a fixed budget of requests (default 500); each sends a
streamed chat completion (`max_tokens` new tokens, `stream_options.include_usage`) and
measures the time to the first content chunk (TTFT) and to the end. The run stops by itself
when the budget is spent or `--deadline` seconds pass (what is still running is then counted
as failed). Prints the machine's load average (other work on a shared machine skews the
numbers), requests, failures, wall time, generated tokens/s (sum of usage `completion_tokens`
over wall time; content chunks counted when a server sends no usage), requests/s, and p50/p99
of TTFT and latency; exits 1 if any request failed. `--ignore-eos` makes every request
generate exactly `--max-tokens` tokens (pocketlm and llama.cpp's `llama-server` both take the
field), so that servers are compared on the same work. `--completions` sends the prompts as
plain text to `/v1/completions` (a model without a chat template).

Run: start `pocketlm serve --port 8080 --queue-size 64` (the queue must hold the clients),
then `python3 scripts/loadtest.py --url http://127.0.0.1:8080 --clients 64 --requests 500`.
"""

import argparse
import http.client
import json
import os
import sys
import threading
import time
import urllib.parse


def percentile(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def one_request(host, port, path, body, headers, timeout):
    """Returns (ttft_s, total_s, completion_tokens); raises on any failure."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    t0 = time.perf_counter()
    conn.request("POST", path, body=body, headers=headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    ttft, tokens, done, finish, chunks = None, None, False, None, 0
    buf = b""
    while not done:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(f"stream error: {chunk['error']}")
        for c in chunk.get("choices", []):
            if c.get("delta", {}).get("content") or c.get("text"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
            finish = c.get("finish_reason") or finish
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - t0
    conn.close()
    if tokens is None and done:
        tokens = chunks
    if not done or tokens is None or finish not in ("stop", "length"):
        raise RuntimeError(f"incomplete stream (done={done}, usage={tokens}, finish={finish})")
    if ttft is None:  # an answer of only an end-of-generation token has no content chunk
        ttft = total
    return ttft, total, tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--deadline", type=float, default=540.0, help="stop after this many seconds")
    ap.add_argument("--ignore-eos", action="store_true", help="generate max_tokens every time")
    ap.add_argument("--label", default="", help="printed with the results")
    ap.add_argument("--json-out", default=None, help="also write the results to this JSON file")
    ap.add_argument("--completions", action="store_true",
                    help="send plain prompts to /v1/completions instead of chat messages to "
                         "/v1/chat/completions (for a model without a chat template)")
    ap.add_argument("--shared-prefix", type=int, default=0, metavar="WORDS",
                    help="start every prompt with the same text of this many words (a shared "
                         "system prompt, for a server's prefix cache)")
    args = ap.parse_args()
    u = urllib.parse.urlparse(args.url)
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    path = "/v1/completions" if args.completions else "/v1/chat/completions"
    prompts = ["Say hello.", "What is 2+2?", "Name a color.", "Write one word about the sea."]
    if args.shared_prefix:
        words = ("you are a helpful assistant who answers briefly and plainly "
                 "about the sea the sky and numbers").split()
        prefix = " ".join(words[i % len(words)] for i in range(args.shared_prefix))
        prompts = [f"{prefix}\n{p}" for p in prompts]
    lock = threading.Lock()
    state = {"next": 0}
    ttfts, totals, tokens, failures = [], [], [], []
    t_start = time.perf_counter()
    deadline = t_start + args.deadline

    def client():
        while True:
            with lock:
                i = state["next"]
                if i >= args.requests or time.perf_counter() > deadline:
                    return
                state["next"] = i + 1
            text = prompts[i % len(prompts)]
            body = json.dumps({
                **({"prompt": text} if args.completions
                   else {"messages": [{"role": "user", "content": text}]}),
                "max_tokens": args.max_tokens, "temperature": 0.7, "seed": i, "stream": True,
                "stream_options": {"include_usage": True},
                **({"ignore_eos": True} if args.ignore_eos else {}),
            })
            try:
                remaining = max(1.0, deadline - time.perf_counter())
                ttft, total, n = one_request(u.hostname, u.port or 80, path, body, headers,
                                             remaining)
                with lock:
                    ttfts.append(ttft)
                    totals.append(total)
                    tokens.append(n)
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    failures.append(f"request {i}: {e}")

    load_before = os.getloadavg()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()) + 5)
    wall = time.perf_counter() - t_start
    with lock:
        sent = state["next"]
        done = len(totals)
    unfinished = sent - done - len(failures)
    if args.label:
        print(f"== {args.label}")
    la = os.getloadavg()
    print(f"load average before {load_before[0]:.2f}, after {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} "
          f"({os.cpu_count()} CPUs)")
    print(f"clients {args.clients}, requests {done} ok / {len(failures)} failed / {unfinished} unfinished "
          f"/ {args.requests - sent} not sent, max_tokens {args.max_tokens}")
    print(f"wall {wall:.1f} s, generated tokens {sum(tokens)}, throughput {sum(tokens) / wall:.1f} tokens/s, "
          f"{done / wall:.2f} requests/s")
    print(f"time to first token: p50 {percentile(ttfts, 50):.3f} s, p99 {percentile(ttfts, 99):.3f} s")
    print(f"latency: p50 {percentile(totals, 50):.3f} s, p99 {percentile(totals, 99):.3f} s")
    for f in failures[:10]:
        print("  " + f)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump({"label": args.label, "clients": args.clients, "ok": done,
                       "failed": len(failures), "wall_s": wall, "tokens": sum(tokens),
                       "tokens_per_s": sum(tokens) / wall,
                       "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
                       "latency_p50": percentile(totals, 50),
                       "latency_p99": percentile(totals, 99)}, fh)
    sys.exit(0 if done == args.requests else 1)


if __name__ == "__main__":
    main()
