"""Dumps llama.cpp's intermediate tensors (the graph's named `f32` nodes) for one prompt.

Used to find the first operation where pocketlm's CPU numerics part from ggml's: llama.cpp
calls `cb_eval` after each node; this copies every contiguous f32 node into an .npz named
`<tensor name>` (e.g. `attn_norm-0`, `Qcur-0`, `kq_soft_max-0`, `ffn_geglu-0`, `l_out-0`,
`result_output`), shaped like numpy reads ggml's `ne` reversed.

Run: /root/ref/bin/python scripts/debug/ggml_dump.py MODEL.gguf "prompt" out.npz [--f32-kv] [--steps N]
(`--steps N`: after the prompt, N greedy tokens one by one, dumped as `<name>@<step>`.)
"""
import argparse
import ctypes

import numpy as np
import llama_cpp
from llama_cpp import Llama

MAX_DIMS, MAX_OP_PARAMS, MAX_SRC, MAX_NAME = 4, 64, 10, 64


class GgmlTensor(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * MAX_DIMS),
        ("nb", ctypes.c_size_t * MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("prompt")
    ap.add_argument("out")
    ap.add_argument("--f32-kv", action="store_true")
    ap.add_argument("--steps", type=int, default=0)
    a = ap.parse_args()
    dumped = {}
    tag = {"s": ""}

    @llama_cpp.ggml_backend_sched_eval_callback
    def cb(t, ask, _user):
        if ask:
            return True
        t = ctypes.cast(t, ctypes.POINTER(GgmlTensor)).contents
        name = t.name.decode(errors="replace")
        ne = list(t.ne)
        nb = list(t.nb)
        if t.type != 0 or not t.data:  # f32 only
            return True
        contiguous = nb[0] == 4 and all(nb[i] == nb[i - 1] * ne[i - 1] for i in range(1, 4))
        if not contiguous:
            return True
        n = int(np.prod(ne))
        buf = (ctypes.c_float * n).from_address(t.data)
        key = name + tag["s"]
        if key not in dumped:
            dumped[key] = np.array(buf, dtype=np.float32).reshape(ne[::-1])
        return True

    lib = llama_cpp.llama_cpp  # the module `Llama` reads its defaults from
    orig = lib.llama_context_default_params

    def with_cb():
        p = orig()
        p.cb_eval = cb
        return p

    lib.llama_context_default_params = with_cb
    kw = dict(n_ctx=1024, n_batch=512, n_threads=2, logits_all=True, verbose=False)
    if a.f32_kv:
        kw.update(flash_attn=False, type_k=0, type_v=0)
    llm = Llama(model_path=a.model, **kw)
    ids = llm.tokenize(a.prompt.encode(), add_bos=True, special=False)
    llm.eval(ids)
    toks = []
    for s in range(a.steps):
        t = int(np.argmax(np.array(llm.scores[llm.n_tokens - 1])))
        toks.append(t)
        tag["s"] = f"@{s + 1}"
        llm.eval([t])
    np.savez(a.out, **dumped, __ids=np.array(ids), __greedy=np.array(toks))
    print(f"{len(dumped)} tensors; prompt ids {ids}; greedy {toks}")


if __name__ == "__main__":
    main()
