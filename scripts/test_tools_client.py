#!/usr/bin/env python3
"""Checks tool calling, structured output, `/v1/responses` and `/v1/messages` of `pocketlm serve`
with the official clients: `openai` (chat completions and `responses.create`) and `anthropic`
(`messages.create`).

Setup (versions used: Python 3.11, openai 3.54.0, anthropic 2.16.0, jsonschema 4.26.0):
    python3 -m venv /root/venv-agents
    /root/venv-agents/bin/pip install openai==3.54.0 anthropic==2.16.0 jsonschema==4.26.0
Run against a server (e.g. `pocketlm serve --port 8080`):
    /root/venv-agents/bin/python scripts/test_tools_client.py --base-url http://127.0.0.1:8080 --part basic
The Rust test `crates/pocketlm-server/tests/it/openai_client.rs` does this by itself.

Parts:
- `basic` (no grammar needed): both endpoints answer the clients' calls with tools offered
  (`tool_choice` auto), streamed and not; the last legs of a tool round trip (the call and the
  tool result sent back, a final answer out) through all three APIs; 400s for refused fields
  surface as the clients' BadRequestError.
- `enforced` (needs the grammar engine): a full round trip with `tool_choice` required
  (openai chat, streamed and not; `responses.create`; anthropic `tool_choice: any`), then 100
  varied prompts with `tool_choice: "required"` and 100 with `response_format` json_schema, every
  output validated with `jsonschema`.
"""

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor

import anthropic
import jsonschema
import openai

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a time zone",
                                      "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                                                     "required": ["tz"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}")
        sys.exit(1)
    print(f"ok: {what}")


def stream_chat(client, **kw):
    """Streams a chat completion; returns (content, {index: [name, arguments, id]}, finish)."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        if c.delta.content:
            content += c.delta.content
        for tc in c.delta.tool_calls or []:
            slot = calls.setdefault(tc.index, ["", "", None])
            if tc.id:
                slot[2] = tc.id
            if tc.function and tc.function.name:
                slot[0] += tc.function.name
            if tc.function and tc.function.arguments:
                slot[1] += tc.function.arguments
        finish = c.finish_reason or finish
    return content, calls, finish


def basic(oa, an, model):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = oa.chat.completions.create(model=model, messages=msgs, tools=TOOLS, max_tokens=8, temperature=0)
    c = r.choices[0]
    check(c.finish_reason in ("stop", "length", "tool_calls"), f"chat with tools (auto): {c.finish_reason}")
    check(r.usage.prompt_tokens > 100, f"the tools reach the prompt ({r.usage.prompt_tokens} tokens)")
    content, _, finish = stream_chat(oa, model=model, messages=msgs, tools=TOOLS, max_tokens=8, temperature=0)
    check(finish in ("stop", "length", "tool_calls"), "streamed chat with tools (auto)")
    if c.message.content is not None and finish != "tool_calls":
        check(content == c.message.content, "streamed == non-streamed (greedy)")
    # The last legs of a round trip: the call and its result go back, an answer comes out.
    follow = msgs + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature": 21, "sky": "clear"})},
    ]
    r = oa.chat.completions.create(model=model, messages=follow, tools=TOOLS, max_tokens=16, temperature=0)
    check(isinstance(r.choices[0].message.content, str), f"final answer after a tool result: {r.choices[0].message.content!r}")

    resp = oa.responses.create(model=model, input="What is the weather in Paris?", instructions="Be brief.",
                               tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMS}],
                               max_output_tokens=8, temperature=0)
    check(resp.status in ("completed", "incomplete") and resp.output, f"responses.create with tools: {resp.status}")
    check(isinstance(resp.output_text, str), f"responses output_text {resp.output_text!r}")
    events = [e.type for e in oa.responses.create(model=model, input="Say hello.", max_output_tokens=4, stream=True)]
    check(events[0] == "response.created" and events[-1] in ("response.completed", "response.incomplete"),
          f"responses stream events {events[:3]}...{events[-1:]}")
    resp = oa.responses.create(model=model, max_output_tokens=8, input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather",
         "arguments": json.dumps({"city": "Paris", "unit": "celsius"})},
        {"type": "function_call_output", "call_id": "call_1", "output": "21 C, clear"},
    ], tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMS}])
    check(resp.output and resp.output[0].type in ("message", "function_call"), "responses round-trip input items")

    atools = [{"name": "get_weather", "description": "Current weather", "input_schema": WEATHER_PARAMS}]
    m = an.messages.create(model=model, max_tokens=8, system="Be brief.", tools=atools,
                           messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    check(m.type == "message" and m.role == "assistant" and m.content, f"anthropic messages.create: {m.stop_reason}")
    with an.messages.stream(model=model, max_tokens=6, messages=[{"role": "user", "content": "Say hello."}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    check(final.content[0].text == text, f"anthropic stream text {text!r}")
    m = an.messages.create(model=model, max_tokens=8, tools=atools, messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Paris", "unit": "celsius"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "21 C, clear"}]},
    ])
    check(m.content and m.content[0].type in ("text", "tool_use"), "anthropic tool_result round trip")

    for call in (lambda: oa.chat.completions.create(model=model, messages=msgs, max_tokens=1, extra_body={"audio": {}}),
                 lambda: an.messages.create(model=model, max_tokens=1, messages=msgs, extra_body={"thinking": {}})):
        try:
            call()
            check(False, "a refused field must fail")
        except (openai.BadRequestError, anthropic.BadRequestError) as e:
            check("audio" in str(e) or "thinking" in str(e), f"refused field named: {type(e).__name__}")


PROMPTS = [f"{q} {c}?" for q in ("What is the weather in", "Is it raining in", "How warm is it in", "Weather report for")
           for c in ("Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Sydney", "Quito", "Rome", "Nairobi", "Seoul",
                     "Denver", "Hanoi", "Dakar", "Perth", "Bergen", "Porto", "Austin", "Delhi", "Riga", "Kyoto",
                     "Accra", "Minsk", "Tunis", "Zagreb", "Bogota")]


def enforced(oa, an, model):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    # Full round trip, not streamed.
    r = oa.chat.completions.create(model=model, messages=msgs, tools=TOOLS, tool_choice="required",
                                   max_tokens=48, temperature=0)
    c = r.choices[0]
    check(c.finish_reason == "tool_calls" and c.message.tool_calls,
          f"required: a tool call (got {c.finish_reason}: {c.message.content!r} {c.message.tool_calls})")
    tc = c.message.tool_calls[0]
    jsonschema.validate(json.loads(tc.function.arguments), SCHEMAS[tc.function.name])
    follow = msgs + [c.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": tc.id, "content": "21 C, clear"}]
    r2 = oa.chat.completions.create(model=model, messages=follow, tools=TOOLS, max_tokens=24, temperature=0)
    check(isinstance(r2.choices[0].message.content, str), "round trip: final answer")
    # Streamed.
    _, calls, finish = stream_chat(oa, model=model, messages=msgs, tools=TOOLS, tool_choice="required",
                                   max_tokens=48, temperature=0)
    check(finish == "tool_calls" and calls, "streamed required: tool_calls deltas")
    name, args, call_id = calls[0]
    jsonschema.validate(json.loads(args), SCHEMAS[name])
    check(name == tc.function.name and args == tc.function.arguments,
          f"streamed call == non-streamed call ({name} {args!r} vs {tc.function.name} {tc.function.arguments!r})")
    follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "21 C, clear"}]
    content, _, _ = stream_chat(oa, model=model, messages=follow, tools=TOOLS, max_tokens=24, temperature=0)
    check(isinstance(content, str), "streamed round trip: final answer")
    # Named function.
    r = oa.chat.completions.create(model=model, messages=msgs, tools=TOOLS, max_tokens=48,
                                   tool_choice={"type": "function", "function": {"name": "get_time"}})
    check(r.choices[0].message.tool_calls[0].function.name == "get_time", "named function is called")
    # Responses and anthropic with a forced call.
    resp = oa.responses.create(model=model, input="Weather in Paris?", tool_choice="required", max_output_tokens=48,
                               tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMS}])
    fc = [o for o in resp.output if o.type == "function_call"]
    check(fc and fc[0].name == "get_weather", "responses.create: function_call output")
    jsonschema.validate(json.loads(fc[0].arguments), WEATHER_PARAMS)
    m = an.messages.create(model=model, max_tokens=48, tool_choice={"type": "any"},
                           tools=[{"name": "get_weather", "input_schema": WEATHER_PARAMS}], messages=msgs)
    tu = [b for b in m.content if b.type == "tool_use"]
    check(m.stop_reason == "tool_use" and tu, "anthropic: tool_use block")
    jsonschema.validate(tu[0].input, WEATHER_PARAMS)
    # 100 varied prompts, tool_choice required, sampled; sent 8 at a time, so the server's
    # continuous batching decodes them together (each has its own seed).
    def required_call(i):
        return oa.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[i]}],
                                          tools=TOOLS, tool_choice="required", max_tokens=48,
                                          temperature=1.0, seed=i)

    missing = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(required_call, range(len(PROMPTS))))
    for p, r in zip(PROMPTS, replies):
        for tc in r.choices[0].message.tool_calls or []:
            jsonschema.validate(json.loads(tc.function.arguments), SCHEMAS[tc.function.name])
        if not r.choices[0].message.tool_calls:
            missing.append((p, r.choices[0].finish_reason, r.choices[0].message.content))
    for m in missing:
        print(f"no call: {m!r}")
    check(not missing, f"{len(PROMPTS)} prompts with tool_choice required: every call validates, "
                       f"{len(PROMPTS) - len(missing)} have a call")
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"},
                                                "capital": {"type": "boolean"}},
              "required": ["city", "population", "capital"], "additionalProperties": False}
    def city(i):
        return oa.chat.completions.create(model=model,
                                          messages=[{"role": "user", "content": f"Describe the city in {PROMPTS[i]}"}],
                                          max_tokens=64, temperature=1.0, seed=i,
                                          response_format={"type": "json_schema",
                                                           "json_schema": {"name": "city", "schema": schema,
                                                                           "strict": True}})

    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(city, range(len(PROMPTS))))
    for r in replies:
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    check(True, f"{len(PROMPTS)} prompts with response_format json_schema: every answer validates")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True, help="http://host:port (no /v1)")
    ap.add_argument("--api-key", default="sk-none")
    ap.add_argument("--part", choices=["basic", "enforced"], default="basic")
    args = ap.parse_args()
    oa = openai.OpenAI(base_url=f"{args.base_url}/v1", api_key=args.api_key, max_retries=0)
    an = anthropic.Anthropic(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    model = oa.models.list().data[0].id
    (basic if args.part == "basic" else enforced)(oa, an, model)
    print("all checks passed")


if __name__ == "__main__":
    main()
