#!/usr/bin/env python3
"""GGUF versions of the tiny random-weight models of `tiny_archs.py`, written by llama.cpp's own
converter, with llama.cpp's logits on them, for `crates/pocketlm/tests/it/archs_golden.rs`
(`*_gguf` tests).

Each folder `crates/pocketlm/tests/golden/archs/<name>/` (qwen2, qwen3, gemma2, gemma3, phi3,
mistral) goes through `convert_hf_to_gguf.py` of the llama.cpp that llama-cpp-python 0.3.36
vendors (`--outtype f32`: exact for the folders' bfloat16 weights, and llama.cpp then keeps
activations in f32; with bf16 weights it rounds them to bf16 before each product) into
`crates/pocketlm/tests/golden/archs/<name>.gguf`. The converter identifies byte-level BPE
tokenizers by hashing their output on a fixed text and does not know the one trained for these
models, so the script declares it as `gpt-2` (what it is: byte-level BPE with GPT-2's split
regex); Gemma's converter wants a SentencePiece `tokenizer.model`, so Gemma folders take the
same byte-level path. The model name is set to `tiny-random` (llama.cpp's vocabulary loader
looks up Phi-3's `<|endoftext|>` token when the name says phi3, and this vocabulary has none).
Nothing else is changed: tensor names, layouts (llama.cpp's q/k
permutation for Llama/Mistral), norms (+1 for Gemma), RoPE metadata and LongRoPE factor tensors
are the converter's.

Then llama.cpp (llama-cpp-python 0.3.36, f32 KV cache, no flash attention) evaluates the 20-token
prompt of `<name>.golden.safetensors` on the GGUF; `<name>.gguf_llamacpp.safetensors` keeps the
logits of every position (`logits` `[20, 320]` f32).

Setup: as `gemma3_llamacpp.py`, plus `pip download --no-deps --no-binary :all:
llama-cpp-python==0.3.36` (the sdist, for the converter and its gguf-py) into `$SDIST_DIR`
(default /tmp/llama-cpp-python-sdist).
Run: /root/ref/bin/python scripts/golden/tiny_gguf.py
"""
import glob
import os
import subprocess
import sys
import tarfile

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
ARCHS = os.path.join(ROOT, "crates", "pocketlm", "tests", "golden", "archs")
NAMES = ["qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mistral"]
SDIST_DIR = os.environ.get("SDIST_DIR", "/tmp/llama-cpp-python-sdist")


def vendored_llama_cpp():
    found = glob.glob(os.path.join(SDIST_DIR, "llama_cpp_python-0.3.36", "vendor", "llama.cpp"))
    if found:
        return found[0]
    os.makedirs(SDIST_DIR, exist_ok=True)
    tgz = glob.glob(os.path.join(SDIST_DIR, "llama_cpp_python-0.3.36.tar.gz"))
    if not tgz:
        subprocess.check_call([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                               "--no-binary", ":all:", "--no-build-isolation", "-d", SDIST_DIR,
                               "llama-cpp-python==0.3.36"])
        tgz = glob.glob(os.path.join(SDIST_DIR, "llama_cpp_python-0.3.36.tar.gz"))
    with tarfile.open(tgz[0]) as t:
        t.extractall(SDIST_DIR)
    return os.path.join(SDIST_DIR, "llama_cpp_python-0.3.36", "vendor", "llama.cpp")


CONVERT = r'''
import sys
sys.path.insert(0, {llama!r} + "/gguf-py")
sys.path.insert(0, {llama!r})
sys.argv = ["convert_hf_to_gguf.py", {src!r}, "--outtype", "f32", "--outfile", {out!r},
            "--model-name", "tiny-random"]
import convert_hf_to_gguf as c
import conversion.base as base
# The tiny models' tokenizer: byte-level BPE with GPT-2's pre-tokenizer (see the docstring).
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
import conversion.gemma, conversion.phi
for m in (conversion.gemma, conversion.phi):
    for cls in vars(m).values():
        if isinstance(cls, type) and issubclass(cls, base.TextModel) and "set_vocab" in vars(cls):
            cls.set_vocab = lambda self: self._set_vocab_gpt2()
c.main()
'''


def main():
    llama = vendored_llama_cpp()
    from llama_cpp import Llama
    for name in NAMES:
        src = os.path.join(ARCHS, name)
        out = os.path.join(ARCHS, f"{name}.gguf")
        code = CONVERT.format(llama=llama, src=src, out=out)
        subprocess.check_call([sys.executable, "-c", code], stdout=subprocess.DEVNULL)
        ids = [int(i) for i in load_file(os.path.join(ARCHS, f"{name}.golden.safetensors"))["ids"]]
        llm = Llama(model_path=out, n_ctx=64, n_batch=64, n_threads=2, logits_all=True,
                    flash_attn=False, type_k=0, type_v=0, verbose=False)
        llm.eval(ids)
        logits = np.array(llm.scores[:len(ids)], dtype=np.float32)
        save_file({"logits": logits}, os.path.join(ARCHS, f"{name}.gguf_llamacpp.safetensors"),
                  metadata={"llama_cpp_python": __import__("llama_cpp").__version__})
        print(name, os.path.getsize(out), "bytes; argmax", logits.argmax(-1)[-5:].tolist())
        del llm


if __name__ == "__main__":
    main()
