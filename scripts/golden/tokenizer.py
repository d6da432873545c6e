#!/usr/bin/env python3
"""Golden files for pocketlm's tokenizers (crates/pocketlm/tests/it/tokenizer_golden.rs).

Writes, under crates/pocketlm/tests/golden/tokenizer/:

- smollm2.json: ~30 varied strings tokenized by Hugging Face transformers from the real default
  GGUF (SmolLM2-135M-Instruct.Q4_1.gguf, byte-level BPE, tokenizer.ggml.pre = smollm): ids with
  and without special tokens, decoded text with and without special tokens. When llama-cpp-python
  is installed, llama.cpp's ids (parse_special=True) and its end-of-generation ids are recorded
  too, as a second reference.
- tiny_spm.gguf: a metadata-only GGUF holding a tiny SentencePiece BPE vocabulary (byte fallback,
  `<0xNN>` byte tokens, `▁` spaces) trained here with the sentencepiece library on a small
  built-in corpus, written with the same key names llama.cpp's converter uses.
- tiny_spm.json: strings tokenized from tiny_spm.gguf by transformers (the asserted reference),
  plus the ids of sentencepiece itself and of llama.cpp for information.

How to run (from the repository root; no torch GPU needed, but transformers' GGUF reader imports
torch):

    python3 -m venv /root/venv-tok
    /root/venv-tok/bin/pip install transformers==5.23.0 tokenizers==0.23.3 gguf==0.19.0 \
        sentencepiece==0.2.3 protobuf==7.36.2 torch==2.15.0
    # optional second reference (builds llama.cpp from source):
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
        /root/venv-tok/bin/pip install llama-cpp-python==0.3.36
    /root/venv-tok/bin/python scripts/golden/tokenizer.py

The model is found at $POCKETLM_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf
(POCKETLM_HOME defaults to ~/.cache/pocketlm). Versions used for the committed files:
transformers 5.23.0, tokenizers 0.23.3, gguf 0.19.0, sentencepiece 0.2.3, torch 2.15.0,
llama-cpp-python 0.3.36.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

import gguf
import sentencepiece as spm
import transformers
from transformers import AutoTokenizer

try:
    import llama_cpp
except ImportError:  # the second reference is optional
    llama_cpp = None

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "crates" / "pocketlm" / "tests" / "golden" / "tokenizer"
HOME = Path(os.environ.get("POCKETLM_HOME", Path.home() / ".cache" / "pocketlm"))
MODEL = HOME / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

SMOLLM_CASES = [
    "Hello world",
    "Hello, world! How are you today?",
    "12345",
    "The year 2024 had 366 days; pi is about 3.14159, not 3,14.",
    "I'm sure they're here, we'll see, you've got it, she'd know, it's John's.",
    "DON'T SHOUT, I'LL LEAVE. We'Re FINE'S",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "fn main() {\n\tprintln!(\"{}\", x.len()); // done\n}",
    "   leading spaces and trailing   ",
    "multiple\n\nnewlines\n\n\n and\ttabs\t\there  \n  ",
    "I love 🦀 and 🤗! 👍🏽 👨‍👩‍👧 🇫🇷",
    "你好，世界！今天天气很好。",
    "こんにちは世界、カタカナとひらがな",
    "안녕하세요 세계",
    "Café naïve façade résumé — Ångström, Zürich, São Paulo, Øresund",
    "Привет мир. Γειά σου Κόσμε. مرحبا بالعالم. שלום",
    "e\u0301 (combining acute) vs é, n\u0303 vs ñ, ﬁ ligature, ①②",
    "Visit https://huggingface.co/HuggingFaceTB?x=1&y=2 <b>bold</b> {\"json\": [1, 2.5e-3]}",
    "$$$ 100% ### @user #hashtag ~~strike~~ a--b...c!!!??? ¿¡",
    "3.141592653589793 1,000,000 0x1F 1e-9 007",
    "<|im_end|><|im_start|>assistant<|endoftext|>",
    "<|im_start text <|im_end  |im_end|> <reponame>foo<filename>bar",
    "",
    " ",
    "\n",
    "a\u00a0b\u2003c\u200bd",
]

SMOLLM_CHAT = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hi in French 🇫🇷"},
        {"role": "assistant", "content": "Salut !"},
        {"role": "user", "content": "Merci, et en japonais ?"},
    ],
]

SPM_CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.
A tokenizer splits text into pieces; the pieces become ids, and the ids go into the model.
SentencePiece treats the input as a raw stream and uses a meta symbol for spaces.
Byte fallback turns characters that are not in the vocabulary into their UTF-8 bytes.
Numbers like 12, 345 and 6789 appear in text, and so do words like naive and cafe.
She said hello, he said goodbye, and they all went home together in the evening.
Models learn to predict the next token from the previous tokens in the sequence.
"""

SPM_CASES = [
    "Hello world",
    "the quick brown fox",
    " leading space",
    "two  spaces and   three",
    "The dog sleeps.\nNew line\ttab",
    "unseen: Zebra Quokka xylophone",
    "bytes: café 你好 🦀",
    "<s>after bos",
    "text before </s> and after",
    "a <tool> in the middle<tool>",
    "12345 67",
    "",
]


def bytes_free_json(obj):
    return json.dumps(obj, ensure_ascii=False, indent=1) + "\n"


def llama_cpp_model(path):
    if llama_cpp is None:
        return None
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def llama_cpp_tokenize(llm, text):
    # add_bos=False: the transformers ids without special tokens are the ones compared.
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def llama_cpp_eog(llm):
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    return [i for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i)]


def record(tok, text, llm):
    ids = tok.encode(text, add_special_tokens=False)
    case = {
        "text": text,
        "ids": ids,
        "ids_with_special": tok.encode(text, add_special_tokens=True),
        "decoded": tok.decode(ids, skip_special_tokens=False),
        "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
    }
    if llm is not None:
        case["llama_cpp_ids"] = llama_cpp_tokenize(llm, text)
    return case


def smollm2():
    if not MODEL.exists():
        sys.exit(f"model not found: {MODEL} (set POCKETLM_HOME)")
    tok = AutoTokenizer.from_pretrained(str(MODEL.parent), gguf_file=MODEL.name)
    llm = llama_cpp_model(MODEL)
    texts = list(SMOLLM_CASES)
    for messages in SMOLLM_CHAT:
        texts.append(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    cases = [record(tok, t, llm) for t in texts]
    out = {
        "source": "transformers AutoTokenizer.from_pretrained(gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf)",
        "versions": versions(),
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "vocab_size": len(tok),
        "cases": cases,
    }
    if llm is not None:
        out["llama_cpp_eog_ids"] = llama_cpp_eog(llm)
    report_disagreements("smollm2", cases)
    return out


def versions():
    v = {
        "transformers": transformers.__version__,
        "tokenizers": __import__("tokenizers").__version__,
        "sentencepiece": spm.__version__,
    }
    if llama_cpp is not None:
        v["llama_cpp_python"] = llama_cpp.__version__
    return v


def report_disagreements(name, cases, key="llama_cpp_ids"):
    for c in cases:
        if key in c and c[key] != c["ids"]:
            print(f"{name}: {key} differs from transformers for {c['text']!r}", file=sys.stderr)


# GGUF token types (llama.cpp include/llama.h).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def train_tiny_spm(workdir):
    corpus = Path(workdir) / "corpus.txt"
    corpus.write_text(SPM_CORPUS * 4, encoding="utf-8")
    prefix = str(Path(workdir) / "tiny")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=prefix,
        model_type="bpe",
        vocab_size=420,
        byte_fallback=True,
        character_coverage=1.0,
        user_defined_symbols=["<tool>"],
        num_threads=1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=prefix + ".model")


def write_spm_gguf(sp, path):
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(UNKNOWN)
        elif sp.is_control(i):
            types.append(CONTROL)
        elif sp.is_byte(i):
            types.append(BYTE)
        elif sp.is_unused(i):
            types.append(UNUSED)
        elif tokens[-1] == "<tool>":
            types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
    w = gguf.GGUFWriter(str(path), arch="llama")
    # Minimal llama hyper-parameters so that readers expecting a model accept the file.
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_spm():
    with tempfile.TemporaryDirectory() as tmp:
        sp = train_tiny_spm(tmp)
    path = OUT / "tiny_spm.gguf"
    write_spm_gguf(sp, path)
    tok = AutoTokenizer.from_pretrained(str(OUT), gguf_file=path.name)
    llm = llama_cpp_model(path)
    cases = []
    for text in SPM_CASES:
        case = record(tok, text, llm)
        case["sentencepiece_ids"] = sp.encode(text)
        cases.append(case)
    report_disagreements("tiny_spm", cases)
    report_disagreements("tiny_spm", cases, "sentencepiece_ids")
    return {
        "source": "transformers AutoTokenizer.from_pretrained(gguf_file=tiny_spm.gguf)",
        "versions": versions(),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "vocab_size": len(tok),
        "cases": cases,
    }


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "smollm2.json").write_text(bytes_free_json(smollm2()), encoding="utf-8")
    (OUT / "tiny_spm.json").write_text(bytes_free_json(tiny_spm()), encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
