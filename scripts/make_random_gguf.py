"""Write a GGUF with random weights of a real model's shapes, for speed measurements only.

usage: make_random_gguf.py OUT TYPE [--shape SHAPE]
  TYPE in q4_0 q8_0 q4_k q5_k iq4_nl iq4_xs (output.weight is q6_k for the k-quants and the iq4
  types); SHAPE (default 8b):
    8b         Llama-3-8B         (llama; hidden 4096, 32 layers, 32/8 heads, ffn 14336)
    1b         Llama-3.2-1B       (llama; 2048, 16 layers, 32/8 heads, ffn 8192)
    qwen2-7b   Qwen2.5-7B         (qwen2: q/k/v biases; 3584, 28 layers, 28/4 heads, ffn 18944)
    qwen3-8b   Qwen3-8B           (qwen3: per-head q/k RMSNorm; 4096, 36 layers, 32/8 heads, ffn 12288)
    qwen3-1.7b Qwen3-1.7B         (qwen3; 2048, 28 layers, 16/8 heads, head_dim 128, ffn 6144)
    phi3-mini  Phi-3-mini-4k      (phi3: fused qkv and gate/up, head_dim 96, window 2047;
                                   3072, 32 layers, 32/32 heads, ffn 8192)
    gemma3-4b  Gemma-3-4B         (gemma3: q/k norms, post norms, GeGLU, head_dim 256, window
                                   1024 on 5 of 6 layers; 2560, 34 layers, 8/4 heads, ffn 10240;
                                   Llama 3's vocabulary, as llama.cpp ships no Gemma 3 one)
    gemma3-1b  Gemma-3-1B         (gemma3; 1152, 26 layers, 4/1 heads, head_dim 256, ffn 6912,
                                   window 512)
    gemma2-2b  Gemma-2-2B         (gemma2: attention soft-cap 50 and final logit soft-cap 30,
                                   post norms, GeGLU, window 4096 on every other layer; 2304, 26
                                   layers, 8/4 heads, head_dim 256, ffn 9216; Llama 3's
                                   vocabulary)
    qwen3-30b-a3b Qwen3-30B-A3B   (qwen3moe: qwen3's attention, every layer a mixture of 128
                                   experts of width 768, 8 per token; 2048, 48 layers, 32/4
                                   heads, head_dim 128; the router f32 with random N(0, 1)
                                   weights, so tokens spread over the experts; Q4_0 ~17 GB)
A llama.cpp-style extension of ../shared/tools/make_random_gguf.py (which writes the first two).
Needs numpy and the `gguf` Python package (PyPI, or llama.cpp's gguf-py on PYTHONPATH; lc/gguf-py
is tried first). Tokenizer metadata comes from a llama.cpp vocabulary GGUF: $VOCAB_GGUF, or
$VOCAB_DIR/ggml-vocab-{llama-bpe,qwen2,phi-3}.gguf by family (VOCAB_DIR default lc/models; the
llama-cpp-python sdist ships them under vendor/llama.cpp/models/), so the vocabulary size and the
output layer are the family's own. Norm weights are ones; quantized blocks random with a fixed
scale (Q4_0 18 bytes / 32 values with the f16 d first, Q8_0 34/32, Q4_K 144/256 and Q5_K 176/256
with f16 d and dmin first, Q6_K 210/256 with f16 d last; q4_k and q5_k files get a Q6_K output
layer, as llama.cpp's Q4_K_M/Q5_K_M do). An 8B Q4_0 file takes about 30 s on the GPU machine.
$LAYERS overrides the layer count (a small file to check the format with), $CTX the context
length written (default 8192, Phi-3 4096). Tensors are generated and written one at a time, so
memory stays at the largest tensor whatever the file's size.
"""
import os
import sys

import numpy as np

sys.path.insert(0, "lc/gguf-py")
import gguf  # noqa: E402

SHAPES = {
    "8b": dict(arch="llama", vocab="llama-bpe", n_embd=4096, n_layer=32, n_head=32, n_kv=8,
               n_ff=14336, rope=500000.0, eps=1e-5),
    "1b": dict(arch="llama", vocab="llama-bpe", n_embd=2048, n_layer=16, n_head=32, n_kv=8,
               n_ff=8192, rope=500000.0, eps=1e-5),
    "qwen2-7b": dict(arch="qwen2", vocab="qwen2", n_embd=3584, n_layer=28, n_head=28, n_kv=4,
                     n_ff=18944, rope=1e6, eps=1e-6, qkv_bias=True),
    "qwen3-8b": dict(arch="qwen3", vocab="qwen2", n_embd=4096, n_layer=36, n_head=32, n_kv=8,
                     n_ff=12288, rope=1e6, eps=1e-6, qk_norm=True),
    "qwen3-1.7b": dict(arch="qwen3", vocab="qwen2", n_embd=2048, n_layer=28, n_head=16, n_kv=8,
                       head_dim=128, n_ff=6144, rope=1e6, eps=1e-6, qk_norm=True),
    "phi3-mini": dict(arch="phi3", vocab="phi-3", n_embd=3072, n_layer=32, n_head=32, n_kv=32,
                      n_ff=8192, rope=10000.0, eps=1e-5, fused=True, window=2047, ctx=4096),
    "gemma3-1b": dict(arch="gemma3", vocab="llama-bpe", n_embd=1152, n_layer=26, n_head=4, n_kv=1,
                      head_dim=256, n_ff=6912, rope=1e6, eps=1e-6, qk_norm=True, post_norms=True,
                      window=512, tied=True),
    "gemma2-2b": dict(arch="gemma2", vocab="llama-bpe", n_embd=2304, n_layer=26, n_head=8, n_kv=4,
                      head_dim=256, n_ff=9216, rope=10000.0, eps=1e-6, post_norms=True,
                      window=4096, tied=True, attn_softcap=50.0, final_softcap=30.0),
    "gemma3-4b": dict(arch="gemma3", vocab="llama-bpe", n_embd=2560, n_layer=34, n_head=8, n_kv=4,
                      head_dim=256, n_ff=10240, rope=1e6, eps=1e-6, qk_norm=True, post_norms=True,
                      window=1024, tied=True),
    "qwen3-30b-a3b": dict(arch="qwen3moe", vocab="qwen2", n_embd=2048, n_layer=48, n_head=32,
                          n_kv=4, head_dim=128, n_ff=6144, rope=1e6, eps=1e-6, qk_norm=True,
                          experts=128, experts_used=8, expert_ff=768),
}

out, qtype = sys.argv[1], sys.argv[2]
shape = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--shape" else "8b"
H = SHAPES[shape]
rng = np.random.default_rng(0)
T = gguf.GGMLQuantizationType
BLOCK = {"q4_0": (T.Q4_0, 32, 18, 0), "q8_0": (T.Q8_0, 32, 34, 0),
         "q4_k": (T.Q4_K, 256, 144, 0), "q5_k": (T.Q5_K, 256, 176, 0),
         "q6_k": (T.Q6_K, 256, 210, 208),
         "iq4_nl": (T.IQ4_NL, 32, 18, 0), "iq4_xs": (T.IQ4_XS, 256, 136, 0)}


def qtensor(rows, cols, kind, experts=0):
    t, bs, nb, doff = BLOCK[kind]
    a = rng.integers(0, 256, size=(max(experts, 1) * rows, cols // bs, nb), dtype=np.uint8)
    a[:, :, doff:doff + 2] = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    if kind in ("q4_k", "q5_k"):
        a[:, :, 2:4] = np.frombuffer(np.float16(0.001).tobytes(), dtype=np.uint8)
    return (a.reshape(experts, rows, -1) if experts else a.reshape(rows, -1)), t


# (name, byte shape, numpy dtype, ggml type or None, make): announced first, generated and
# written one at a time after the header.
TENSORS = []


def add_q(name, rows, cols, kind, experts=0):
    t, bs, nb, _ = BLOCK[kind]
    shape = ((experts,) if experts else ()) + (rows, cols // bs * nb)
    TENSORS.append((name, shape, np.uint8, t, lambda: qtensor(rows, cols, kind, experts)[0]))


def add_f(name, shape, make):
    TENSORS.append((name, tuple(shape), np.float32, None, make))


def ones(n):
    return lambda: np.ones(n, dtype=np.float32)


vocab_gguf = os.environ.get("VOCAB_GGUF") or os.path.join(
    os.environ.get("VOCAB_DIR", "lc/models"), f"ggml-vocab-{H['vocab']}.gguf")
r = gguf.GGUFReader(vocab_gguf)
arch = H["arch"]
w = gguf.GGUFWriter(out, arch)
for f in r.fields.values():
    if f.name.startswith("tokenizer."):
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
vocab = len(r.fields["tokenizer.ggml.tokens"].contents())
e, nh, nkv, ff = H["n_embd"], H["n_head"], H["n_kv"], H["n_ff"]
L = int(os.environ.get("LAYERS", H["n_layer"]))  # fewer layers: a quick check of the format
hd = H.get("head_dim", e // nh)
w.add_context_length(int(os.environ.get("CTX", H.get("ctx", 8192)))); w.add_embedding_length(e); w.add_block_count(L)
w.add_feed_forward_length(ff); w.add_head_count(nh); w.add_head_count_kv(nkv)
w.add_rope_freq_base(H["rope"]); w.add_layer_norm_rms_eps(H["eps"]); w.add_rope_dimension_count(hd)
if hd != e // nh:
    w.add_key_length(hd); w.add_value_length(hd)
if H.get("window"):
    w.add_sliding_window(H["window"])
if H.get("attn_softcap"):
    w.add_float32(f"{arch}.attn_logit_softcapping", H["attn_softcap"])
    w.add_float32(f"{arch}.final_logit_softcapping", H["final_softcap"])
w.add_vocab_size(vocab)
if H.get("experts"):
    w.add_expert_count(H["experts"]); w.add_expert_used_count(H["experts_used"])
    w.add_expert_feed_forward_length(H["expert_ff"])
add_q("token_embd.weight", vocab, e, qtype)
add_f("output_norm.weight", [e], ones(e))
if not H.get("tied"):
    add_q("output.weight", vocab, e, "q6_k" if qtype in ("q4_k", "q5_k", "iq4_nl", "iq4_xs") else qtype)
q_rows, kv_rows = nh * hd, nkv * hd
for i in range(L):
    if H.get("fused"):
        mats = {"attn_qkv": (q_rows + 2 * kv_rows, e), "attn_output": (e, q_rows),
                "ffn_up": (2 * ff, e), "ffn_down": (e, ff)}
    else:
        mats = {"attn_q": (q_rows, e), "attn_k": (kv_rows, e), "attn_v": (kv_rows, e),
                "attn_output": (e, q_rows)}
        if not H.get("experts"):
            mats.update({"ffn_gate": (ff, e), "ffn_up": (ff, e), "ffn_down": (e, ff)})
    for name, (rows, cols) in mats.items():
        add_q(f"blk.{i}.{name}.weight", rows, cols, qtype)
    if H.get("experts"):
        n, eff = H["experts"], H["expert_ff"]
        add_f(f"blk.{i}.ffn_gate_inp.weight", [n, e],
              lambda: rng.standard_normal((n, e)).astype(np.float32))
        for name, (rows, cols) in {"ffn_gate_exps": (eff, e), "ffn_up_exps": (eff, e),
                                   "ffn_down_exps": (e, eff)}.items():
            add_q(f"blk.{i}.{name}.weight", rows, cols, qtype, experts=n)
    if H.get("qkv_bias"):
        for name, rows in (("attn_q", q_rows), ("attn_k", kv_rows), ("attn_v", kv_rows)):
            add_f(f"blk.{i}.{name}.bias", [rows],
                  lambda rows=rows: (rng.standard_normal(rows) * 0.1).astype(np.float32))
    if H.get("qk_norm"):
        add_f(f"blk.{i}.attn_q_norm.weight", [hd], ones(hd))
        add_f(f"blk.{i}.attn_k_norm.weight", [hd], ones(hd))
    add_f(f"blk.{i}.attn_norm.weight", [e], ones(e))
    add_f(f"blk.{i}.ffn_norm.weight", [e], ones(e))
    if H.get("post_norms"):
        add_f(f"blk.{i}.post_attention_norm.weight", [e], ones(e))
        add_f(f"blk.{i}.post_ffw_norm.weight", [e], ones(e))
for name, dims, dtype, t, _ in TENSORS:
    w.add_tensor_info(name, dims, np.dtype(dtype), int(np.prod(dims)) * np.dtype(dtype).itemsize,
                      raw_dtype=t)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_ti_data_to_file()
for name, dims, dtype, t, make in TENSORS:
    a = make()
    assert a.shape == dims and a.dtype == dtype, (name, a.shape, dims)
    w.write_tensor_data(a)
w.close()
print("wrote", out, qtype, shape)
