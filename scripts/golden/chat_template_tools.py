#!/usr/bin/env python3
"""Golden file for tool calling in pocketlm's chat templates: typed messages with `tool_calls`
and `tool` turns, and `tools` definitions, rendered by real templates exactly as transformers'
`apply_chat_template(messages, tools=...)` renders them.

Writes crates/pocketlm/tests/golden/chat_template/tools.json; the Rust test
crates/pocketlm/tests/it/chat_template_golden.rs (`tool_calling_*`) deserializes each case's
`openai_messages` (OpenAI's wire shape: `arguments` as JSON text) into `pocketlm`'s `Message`,
renders them and asserts byte equality with `expected`, which is rendered here from
`messages` (the same conversation with `arguments` as a mapping, as Hugging Face templates
expect and as pocketlm hands them to the template).

Templates (the *.jinja files next to the golden files):
- qwen2.5-7b-instruct.jinja: the `chat_template` of Qwen/Qwen2.5-7B-Instruct's
  tokenizer_config.json (Hermes `<tool_call>` format);
- llama-3.2-3b-instruct.jinja: Llama 3.1-style JSON tool calls (`{"name", "parameters"}`), the
  same tool section as Llama 3.1's template;
- mistral-nemo-instruct-2407.jinja: Mistral `[TOOL_CALLS]` with 9-character call ids.

How to run (from the repository root), with transformers 5.23.0 and jinja2 3.1.6:

    /root/ref-ppl/bin/python scripts/golden/chat_template_tools.py
"""

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chat_template as ct  # noqa: E402  (the environment and the suite runner)

WEATHER = ct.WEATHER_TOOL
TIME = ct.TIME_TOOL


def call(call_id, name, args):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def flow(ids, parallel):
    """A full round trip: question, call(s), result(s), answer, next question."""
    calls = [call(ids[0], "get_weather", {"city": "Paris", "unit": "celsius"})]
    results = [{"role": "tool", "tool_call_id": ids[0], "name": "get_weather",
                "content": "{\"temperature\": 21.5, \"sky\": \"clear\"}"}]
    if parallel:
        calls.append(call(ids[1], "get_time", {}))
        results.append({"role": "tool", "tool_call_id": ids[1], "name": "get_time", "content": "14:05"})
    return [
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        *results,
        {"role": "assistant", "content": "It is 21.5 °C and clear in Paris."},
        {"role": "user", "content": "Thanks!"},
    ]


def openai_shape(messages):
    """The same messages as an OpenAI client sends them: arguments as JSON text."""
    out = copy.deepcopy(messages)
    for m in out:
        for c in m.get("tool_calls", []):
            c["function"]["arguments"] = json.dumps(c["function"]["arguments"], ensure_ascii=False)
    return out


def cases(ids, kwargs=None, gen=True):
    kw = dict(kwargs or {})
    sys_user = [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "What is the weather in Paris?"}]
    return [
        {"name": "tools_system_user", "messages": sys_user, "add_generation_prompt": gen,
         "tools": [WEATHER, TIME], "kwargs": kw},
        {"name": "round_trip", "messages": flow(ids, False), "add_generation_prompt": gen,
         "tools": [WEATHER], "kwargs": kw},
        {"name": "parallel_round_trip", "messages": flow(ids, True), "add_generation_prompt": gen,
         "tools": [WEATHER, TIME], "kwargs": kw},
    ]


def main():
    def jinja(name):
        return (ct.OUT / f"{name}.jinja").read_text(encoding="utf-8")

    suites = [
        ct.run_suite("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct tokenizer_config.json",
                     jinja("qwen2.5-7b-instruct"), "", "<|im_end|>",
                     cases(["call_abc123", "call_def456"])),
        ct.run_suite("llama-3.1-style", "meta-llama/Llama-3.2-3B-Instruct (Llama 3.1 tool format)",
                     jinja("llama-3.2-3b-instruct"), "<|begin_of_text|>", "<|eot_id|>",
                     cases(["call_abc123", "call_def456"],
                           {"date_string": "02 Jan 2025", "tools_in_user_message": False})),
        ct.run_suite("mistral-nemo-instruct-2407", "mistralai/Mistral-Nemo-Instruct-2407",
                     jinja("mistral-nemo-instruct-2407"), "<s>", "</s>",
                     cases(["abcDEF123", "ghiJKL456"], gen=False)),
    ]
    for suite in suites:
        for case in suite["cases"]:
            case["openai_messages"] = openai_shape(case["messages"])
    out = ct.OUT / "tools.json"
    out.write_text(json.dumps(suites, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    import transformers
    print(f"cross-checked with transformers {transformers.__version__}; wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
