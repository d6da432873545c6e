#!/usr/bin/env python3
"""Golden files for pocketlm's chat templates (crates/pocketlm/src/chat_template.rs).

Renders real chat templates with Python jinja2 set up exactly as Hugging Face transformers'
`apply_chat_template` sets it up (see "The environment" below), and writes the results to
crates/pocketlm/tests/golden/chat_template/*.json. The Rust test
crates/pocketlm/tests/it/chat_template_golden.rs renders the same inputs and asserts byte equality.

How to run (from the repository root):

    python3 -m venv /root/venv-tmpl
    /root/venv-tmpl/bin/pip install jinja2==3.1.6 gguf==0.19.0 numpy==2.4.6
    # optional cross-check against transformers itself (used: transformers==5.23.0):
    /root/venv-tmpl/bin/pip install transformers==5.23.0
    /root/venv-tmpl/bin/python scripts/golden/chat_template.py

Inputs:
- SmolLM2-135M-Instruct: `tokenizer.chat_template` and the bos/eos token strings read with the
  `gguf` package from $POCKETLM_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf
  (POCKETLM_HOME defaults to ~/.cache/pocketlm).
- Other models: the *.jinja files next to the golden files, verbatim copies of the templates that
  llama.cpp keeps under models/templates/ (copied from the Hugging Face tokenizer_config.json of
  each model): meta-llama/Llama-3.2-3B-Instruct, Qwen/Qwen3-0.6B, google/gemma-2-2b-it,
  microsoft/Phi-3.5-mini-instruct, mistralai/Mistral-Nemo-Instruct-2407, openai/gpt-oss-120b
  (`openai-gpt-oss-120b.jinja`, the harmony format, from llama.cpp as vendored by
  llama-cpp-python 0.3.36; rendered with its `Current date:` replaced by `{TODAY}`).

The environment (facts taken from transformers' `_compile_jinja_template` and
`render_jinja_template`, src/transformers/utils/chat_template_utils.py):
- `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the
  `jinja2.ext.loopcontrols` extension;
- filter `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)` =
  `json.dumps` with those arguments (replacing jinja2's HTML-escaping tojson);
- globals `raise_exception(message)` (raises jinja2 TemplateError(message)) and
  `strftime_now(format)` = `datetime.now().strftime(format)`;
- render context: `messages`, `tools` (None when absent), `documents` (None),
  `add_generation_prompt`, then the special tokens (`bos_token`, `eos_token`) and extra kwargs.
"""

import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "crates" / "pocketlm" / "tests" / "golden" / "chat_template"


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    return datetime.now().strftime(format)


def make_env():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


ENV = make_env()


def render(template, bos, eos, case):
    compiled = ENV.from_string(template)
    kwargs = {"bos_token": bos, "eos_token": eos, **case.get("kwargs", {})}
    return compiled.render(
        messages=case["messages"],
        tools=case.get("tools"),
        documents=None,
        add_generation_prompt=case["add_generation_prompt"],
        **kwargs,
    )


def transformers_render(template, bos, eos, case):
    """The same render through transformers itself, when it is installed (a cross-check)."""
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:
        return None
    kwargs = {"bos_token": bos, "eos_token": eos, **case.get("kwargs", {})}
    rendered, _ = render_jinja_template(
        conversations=[case["messages"]],
        tools=case.get("tools"),
        chat_template=template,
        add_generation_prompt=case["add_generation_prompt"],
        **kwargs,
    )
    return rendered[0]


def run_suite(name, origin, template, bos, eos, cases):
    out_cases = []
    for case in cases:
        case = dict(case)
        case.setdefault("kwargs", {})
        case.setdefault("tools", None)
        try:
            text = render(template, bos, eos, case)
            case["expected"] = text
        except jinja2.exceptions.TemplateError as e:
            text = None
            case["error"] = str(e)
        try:
            ref = transformers_render(template, bos, eos, case)
        except Exception as e:  # transformers raised: must be the same template error
            if text is not None:
                raise RuntimeError(f"{name}/{case['name']}: transformers failed but jinja2 did not: {e}")
            ref = None
        if ref is not None and ref != text:
            raise RuntimeError(f"{name}/{case['name']}: transformers and this environment disagree")
        out_cases.append(case)
    return {"name": name, "origin": origin, "template": template, "bos_token": bos, "eos_token": eos, "cases": out_cases}


# ---------------------------------------------------------------- conversations

SYS_USER = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
MULTI = [
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello! How can I help you today?"},
    {"role": "user", "content": "Tell me a joke about \"quotes\" & <tags>, it's fine.\n"},
]
SYS_MULTI = [
    {"role": "system", "content": "  Answer in French.\n"},
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "Bonjour ! Ça va ? 😊"},
    {"role": "user", "content": "Merci, et toi ?"},
    {"role": "assistant", "content": "Très bien."},
]


def basic_cases(extra_kwargs=None):
    kw = dict(extra_kwargs or {})
    return [
        {"name": "system_user_gen", "messages": SYS_USER, "add_generation_prompt": True, "kwargs": kw},
        {"name": "multi_turn_gen", "messages": MULTI, "add_generation_prompt": True, "kwargs": kw},
        {"name": "multi_turn_nogen", "messages": MULTI, "add_generation_prompt": False, "kwargs": kw},
        {"name": "system_multi_nogen", "messages": SYS_MULTI, "add_generation_prompt": False, "kwargs": kw},
        {"name": "system_multi_gen", "messages": SYS_MULTI, "add_generation_prompt": True, "kwargs": kw},
    ]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather in a city (°C or °F) <b>now</b> & 'today'",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7.5},
            },
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "description": "Current time", "parameters": {"type": "object", "properties": {}}},
}


def tool_call_flow(call_id="abcDEF123"):
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "{\"temperature\": 21.5, \"sky\": \"clear\"}"},
        {"role": "assistant", "content": "It is 21.5 °C and clear in Paris."},
        {"role": "user", "content": "Thanks!"},
    ]


def main():
    suites = []

    # SmolLM2 from the default GGUF.
    from gguf import GGUFReader

    home = Path(os.environ.get("POCKETLM_HOME", Path.home() / ".cache" / "pocketlm"))
    gguf_path = home / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = GGUFReader(str(gguf_path))
    fields = reader.fields
    template = fields["tokenizer.chat_template"].contents()
    tokens = fields["tokenizer.ggml.tokens"].contents()
    bos = tokens[fields["tokenizer.ggml.bos_token_id"].contents()]
    eos = tokens[fields["tokenizer.ggml.eos_token_id"].contents()]
    suites.append(
        (
            "smollm2-135m-instruct",
            run_suite(
                "smollm2-135m-instruct",
                "GGUF tokenizer.chat_template of SmolLM2-135M-Instruct.Q4_1.gguf",
                template,
                bos,
                eos,
                basic_cases(),
            ),
        )
    )

    def jinja(name):
        return (OUT / f"{name}.jinja").read_text(encoding="utf-8")

    llama_kw = {"date_string": "02 Jan 2025"}
    llama_cases = basic_cases(llama_kw) + [
        {"name": "tools_in_user_message", "messages": SYS_USER, "add_generation_prompt": True,
         "tools": [WEATHER_TOOL, TIME_TOOL], "kwargs": llama_kw},
        {"name": "tools_in_system", "messages": SYS_USER, "add_generation_prompt": True,
         "tools": [WEATHER_TOOL], "kwargs": {**llama_kw, "tools_in_user_message": False}},
        {"name": "tool_call_flow", "messages": tool_call_flow(), "add_generation_prompt": True,
         "tools": [WEATHER_TOOL], "kwargs": {**llama_kw, "tools_in_user_message": False}},
        {"name": "tools_without_user_message", "messages": [{"role": "system", "content": "sys"}],
         "add_generation_prompt": True, "tools": [WEATHER_TOOL], "kwargs": llama_kw},
    ]
    suites.append(("llama-3.2-3b-instruct", run_suite(
        "llama-3.2-3b-instruct", "meta-llama/Llama-3.2-3B-Instruct (llama.cpp models/templates)",
        jinja("llama-3.2-3b-instruct"), "<|begin_of_text|>", "<|eot_id|>", llama_cases)))

    qwen_cases = basic_cases() + [
        {"name": "tools", "messages": SYS_USER, "add_generation_prompt": True, "tools": [WEATHER_TOOL, TIME_TOOL]},
        {"name": "tool_call_flow", "messages": tool_call_flow(), "add_generation_prompt": True, "tools": [WEATHER_TOOL]},
        {"name": "reasoning_in_content", "add_generation_prompt": False, "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nSimple sum.\n</think>\n\n4"},
        ]},
        {"name": "enable_thinking_false", "messages": MULTI, "add_generation_prompt": True,
         "kwargs": {"enable_thinking": False}},
    ]
    suites.append(("qwen3-0.6b", run_suite(
        "qwen3-0.6b", "Qwen/Qwen3-0.6B (llama.cpp models/templates)",
        jinja("qwen3-0.6b"), "", "<|im_end|>", qwen_cases)))

    gemma_cases = basic_cases() + [
        {"name": "not_alternating", "add_generation_prompt": True,
         "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
    ]
    suites.append(("gemma-2-2b-it", run_suite(
        "gemma-2-2b-it", "google/gemma-2-2b-it (llama.cpp models/templates)",
        jinja("gemma-2-2b-it"), "<bos>", "<eos>", gemma_cases)))

    phi_cases = basic_cases() + [
        {"name": "empty_system", "add_generation_prompt": True,
         "messages": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]},
    ]
    suites.append(("phi-3.5-mini-instruct", run_suite(
        "phi-3.5-mini-instruct", "microsoft/Phi-3.5-mini-instruct (llama.cpp models/templates)",
        jinja("phi-3.5-mini-instruct"), "<s>", "<|endoftext|>", phi_cases)))

    mistral_cases = basic_cases() + [
        {"name": "tools", "messages": MULTI, "add_generation_prompt": False, "tools": [WEATHER_TOOL, TIME_TOOL]},
        {"name": "tool_call_flow", "messages": tool_call_flow(), "add_generation_prompt": False, "tools": [WEATHER_TOOL]},
        {"name": "bad_tool_call_id", "messages": tool_call_flow("short"), "add_generation_prompt": False},
        {"name": "not_alternating", "add_generation_prompt": True,
         "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
    ]
    suites.append(("mistral-nemo-instruct-2407", run_suite(
        "mistral-nemo-instruct-2407", "mistralai/Mistral-Nemo-Instruct-2407 (llama.cpp models/templates)",
        jinja("mistral-nemo-instruct-2407"), "<s>", "</s>", mistral_cases)))

    # openai/gpt-oss (the harmony format). Its template writes `strftime_now("%Y-%m-%d")` into
    # the system message: the golden text holds `Current date: {TODAY}` there, and the Rust test
    # puts its own `strftime_now` date in its place.
    oss_kw = {"reasoning_effort": "high", "model_identity": "You are a tiny test model."}
    oss_cases = basic_cases() + [
        {"name": "reasoning_identity", "messages": SYS_USER, "add_generation_prompt": True,
         "kwargs": oss_kw},
        {"name": "tools", "messages": SYS_USER, "add_generation_prompt": True,
         "tools": [WEATHER_TOOL, TIME_TOOL]},
        {"name": "builtin_tools", "messages": MULTI, "add_generation_prompt": True,
         "kwargs": {"builtin_tools": ["browser", "python"]}},
        {"name": "tool_call_flow", "messages": tool_call_flow(), "add_generation_prompt": True,
         "tools": [WEATHER_TOOL]},
        {"name": "thinking_last_turn", "add_generation_prompt": False, "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "thinking": "Simple sum.", "content": "4"},
        ]},
        {"name": "channel_tags_in_content", "add_generation_prompt": True, "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<|channel|>final<|message|>Hello"},
            {"role": "user", "content": "Again"},
        ]},
    ]
    oss = run_suite(
        "openai-gpt-oss-120b", "openai/gpt-oss-120b (llama.cpp models/templates)",
        jinja("openai-gpt-oss-120b"), "<|startoftext|>", "<|return|>", oss_cases)
    today = "Current date: " + strftime_now("%Y-%m-%d") + "\n"
    for case in oss["cases"]:
        if "expected" in case:
            assert today in case["expected"], case["name"]
            case["expected"] = case["expected"].replace(today, "Current date: {TODAY}\n")
    suites.append(("openai-gpt-oss-120b", oss))

    # Small synthetic templates pinning down Python/jinja2 behaviours that real templates rely on.
    def feature(name, template, messages=None, **kwargs):
        case = {"name": "render", "messages": messages if messages is not None else SYS_USER,
                "add_generation_prompt": False, "kwargs": kwargs}
        return run_suite(name, "synthetic", template, "<s>", "</s>", [case])

    value = {"b": 1, "a": [1, 2.5, None, True, "x<y>&'z'"], "é": {"nested": "ü\n\t\"q\"\u0001"}, "e": {}, "l": []}
    features = [
        feature("tojson_default", "{{ v | tojson }}", v=value),
        feature("tojson_indent", "{{ v | tojson(indent=2) }}|{{ [] | tojson(indent=2) }}", v=value),
        feature("tojson_indent_string", "{{ v | tojson(indent='\t') }}", v={"k": [1]}),
        feature("tojson_ensure_ascii", "{{ v | tojson(ensure_ascii=True) }}", v={"s": "é😊ü"}),
        feature("tojson_separators_sort", "{{ v | tojson(separators=(',', ':'), sort_keys=True) }}", v=value),
        feature("tojson_floats", "{{ v | tojson }}", v=[0.1, 1.0, 1e20, 1.5e-7, 123456789.125, -0.0, 1e16, 12345678901234567.0, 2]),
        feature("print_python_values", "{{ none }}|{{ true }}|{{ false }}|{{ v }}|{{ [1, 'a', none, true] }}|{{ 1.0 }}|{{ 1e20 }}|{{ 0.5 }}",
                v={"k": "it's", "n": None, "l": [1.5, "x"], "q": "say \"hi\""}),
        feature("string_filter", "{{ v | string }}|{{ 3 | string }}|{{ none | string }}", v={"a": [True, None]}),
        feature("string_methods",
                "{{ '  Hi There  '.strip() }}|{{ 'xxhixx'.strip('x') }}|{{ 'a,b,,c'.split(',') }}|{{ 'a b  c'.split() }}"
                "|{{ 'hello world'.title() }}|{{ 'abc'.startswith('ab') }}|{{ 'abc'.endswith('bc') }}|{{ 'abc'.upper() }}"
                "|{{ 'a-b-c'.replace('-', '+') }}|{{ '\n\nx\n'.lstrip('\n') }}|{{ 'x\n\n'.rstrip() }}|{{ 'ab'.find('b') }}"),
        feature("dict_methods", "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{{ d.get('a') }}{{ d.get('zz', 'dflt') }}{{ d.keys() | list }}",
                d={"z": 1, "a": 2, "m": 3}),
        feature("loop_controls_namespace",
                "{% set ns = namespace(n=0, s='') %}{% for m in messages %}{% if loop.index0 == 0 %}{% continue %}{% endif %}"
                "{% set ns.n = ns.n + 1 %}{% set ns.s = ns.s + m.role %}{% if loop.last %}{% break %}{% endif %}{% endfor %}"
                "{{ ns.n }}:{{ ns.s }}:{{ messages | length }}:{{ messages[-1]['content'] }}:{{ messages[::-1][0].role }}"),
        feature("whitespace_control", "  {% if true %}\n  yes\n  {% endif %}\n{%- for i in range(3) %}\n    {{ i }}\n{% endfor %}\nend\n"),
        feature("undefined_and_tests", "[{{ missing }}]{{ missing is defined }}{{ tools is none }}{{ documents is none }}{{ 'x' is string }}"
                "{{ {} is mapping }}{{ 'x' is iterable }}{{ 3 is number }}{{ strftime_now is defined }}{{ raise_exception is defined }}"),
        feature("raise_exception_custom", "{% if messages | length > 1 %}{{ raise_exception('Too many: ' ~ messages | length) }}{% endif %}ok"),
    ]

    OUT.mkdir(parents=True, exist_ok=True)
    for name, suite in suites:
        (OUT / f"{name}.json").write_text(json.dumps(suite, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    (OUT / "features.json").write_text(json.dumps(features, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    # strftime (the `strftime_now` global) on fixed UTC instants.
    stamps = [0, 951782400, 1721995200, 1735787045, 4102444799, 1709251199]
    formats = ["%d %b %Y", "%Y-%m-%d %H:%M:%S", "%A %B %d, %y %I:%M %p", "%a %j %w %e|%%|%F %T|%D"]
    strf = [
        {"timestamp": t, "format": f, "expected": datetime.fromtimestamp(t, tz=timezone.utc).strftime(f)}
        for t in stamps
        for f in formats
    ]
    (OUT / "strftime.json").write_text(json.dumps(strf, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    try:
        import transformers

        checked = f"cross-checked with transformers {transformers.__version__}"
    except ImportError:
        checked = "transformers not installed: no cross-check"
    print(f"jinja2 {jinja2.__version__}; {checked}; wrote {len(suites) + 2} files to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
