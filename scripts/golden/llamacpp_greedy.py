#!/usr/bin/env python3
"""Golden greedy generations of the default model from llama.cpp, the reference we check against.

Writes crates/pocketlm/tests/golden/generation/smollm2_greedy.json: for each prompt, the text fed
to the model (chat prompts rendered with the model's own template by Python jinja2 in the same
environment transformers uses), llama.cpp's tokenization of it, transformers' tokenization of it
(from the same GGUF), llama.cpp's first 32 greedy token ids with the top-5 logits of every step,
and transformers' top-20 logits at the last prompt position for the GGUF dequantized to f32.

llama.cpp runs with an f32 KV cache and no flash attention (its most precise CPU configuration,
and the one structurally closest to ours). Its default (f16 KV cache) moves the first logits of
this model by ~0.2, about as much as its flash-attention path does: the model's Q4_1 weights with
Q8_1-quantized activations amplify rounding differences, so greedy paths can part at near-ties.

Setup (versions used for the committed file):
    python3 -m venv /root/ref && /root/ref/bin/pip install llama-cpp-python==0.3.36 \
        transformers==5.23.0 gguf==0.19.0 jinja2==3.1.6 numpy sentencepiece torch==2.15.0 accelerate
Run:
    /root/ref/bin/python scripts/golden/llamacpp_greedy.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""
import json
import os
import sys

import jinja2
import numpy as np
from gguf import GGUFReader
from llama_cpp import Llama
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

N_STEPS = 32
HOME = os.environ.get("POCKETLM_HOME", os.path.expanduser("~/.cache/pocketlm"))
MODEL = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HOME, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
OUT = os.environ.get("GOLDEN_OUT") or os.path.join(os.path.dirname(__file__), "..", "..", "crates", "pocketlm", "tests", "golden",
                   "generation", "smollm2_greedy.json")

PLAIN = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
]
CHAT = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write a haiku about the ocean."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a fun fact about octopuses."}],
]


def render(template, messages):
    # transformers' apply_chat_template environment: trim_blocks, lstrip_blocks, raise_exception.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token="<|im_start|>", eos_token="<|im_end|>")


def main():
    import jinja2.sandbox  # noqa: F401
    reader = GGUFReader(MODEL)
    template = reader.fields["tokenizer.chat_template"].contents()
    # f32 KV cache (llama.cpp's default is f16) so that the reference keeps full precision.
    cfg = json.loads(os.environ.get("LLAMA_CFG", '{"flash_attn": false, "type_k": 0, "type_v": 0}'))
    llm = Llama(model_path=MODEL, n_ctx=2048, n_threads=2, n_batch=512, logits_all=True, verbose=False, **cfg)
    hf_tok = AutoTokenizer.from_pretrained(os.path.dirname(MODEL), gguf_file=os.path.basename(MODEL))
    hf_model = AutoModelForCausalLM.from_pretrained(os.path.dirname(MODEL), gguf_file=os.path.basename(MODEL),
                                                    torch_dtype=torch.float32)
    cases = [{"kind": "plain", "text": p} for p in PLAIN]
    cases += [{"kind": "chat", "messages": m, "text": render(template, m)} for m in CHAT]
    for c in cases:
        ids = llm.tokenize(c["text"].encode("utf-8"), add_bos=False, special=True)
        c["prompt_ids"] = list(ids)
        c["hf_prompt_ids"] = hf_tok.encode(c["text"], add_special_tokens=False)
        llm.reset()
        llm.eval(ids)
        out, top5 = [], []
        for step in range(N_STEPS):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            idx = np.argsort(-logits, kind="stable")[:5]
            top5.append([[int(i), float(logits[i])] for i in idx])
            tok = int(np.argmax(logits))
            out.append(tok)
            llm.eval([tok])
        c["greedy_ids"] = out
        c["greedy_text"] = llm.detokenize(out).decode("utf-8", errors="replace")
        c["top5_per_step"] = top5
        # transformers on the same GGUF dequantized to f32 (no activation quantization): the
        # last prompt position's top-20 logits, a check of the architecture itself.
        with torch.no_grad():
            hl = hf_model(torch.tensor([ids])).logits[0, -1].numpy()
        hidx = np.argsort(-hl, kind="stable")[:20]
        c["hf_f32_top20_last"] = [[int(i), float(hl[i])] for i in hidx]
        print(c["kind"], repr(c["text"][:40]), "->", repr(c["greedy_text"][:60]),
              "| tokenization equal:", c["prompt_ids"] == c["hf_prompt_ids"])
    meta = {"model": os.path.basename(MODEL), "llama_config": cfg, "llama_cpp_python": __import__("llama_cpp").__version__,
            "transformers": __import__("transformers").__version__, "steps": N_STEPS}
    with open(OUT, "w") as f:
        json.dump({"meta": meta, "cases": cases}, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
