"""Tests of the pocketlm Python package on the default model (SmolLM2-135M-Instruct Q4_1).

Run by crates/pocketlm-capi/tests/it/python.rs (`cargo test --profile ci --workspace`), which
builds and installs the package into a venv and sets:
- POCKETLM_TEST_EXPECTED: a JSON file with the Rust API's greedy answers to the same requests
  (`prompt`, `max_tokens`, `text`, and `adapter_text` with the adapter below loaded);
- POCKETLM_TEST_ADAPTER: a LoRA adapter folder (mlx-lm format, random weights) for the model;
- POCKETLM_TEST_MINILM: the all-MiniLM-L6-v2 folder (fetched into $POCKETLM_HOME), whose
  embeddings are compared with sentence-transformers' (the goldens committed under
  crates/pocketlm/tests/golden/embeddings, from scripts/golden/embeddings.py).
By hand: `python -m unittest -v test_pocketlm` in this folder after `pip install
./bindings/python`; the tests that need those files are then skipped.
"""

import array
import json
import math
import os
import struct
import sys
import threading
import time
import unittest

import pocketlm

EXPECTED = os.environ.get("POCKETLM_TEST_EXPECTED")
ADAPTER = os.environ.get("POCKETLM_TEST_ADAPTER")
MINILM = os.environ.get("POCKETLM_TEST_MINILM")
GOLDEN_DIR = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..", "..", "..", "crates", "pocketlm", "tests", "golden", "embeddings",
)


def chat_prompt(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}])


class PocketLMTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # No path: the default model, as the CLI loads it.
        cls.model, cls.tokenizer = pocketlm.load()
        cls.expected = None
        if EXPECTED:
            with open(EXPECTED) as f:
                cls.expected = json.load(f)

    def test_load_gives_the_default_model(self):
        self.assertEqual(self.model.architecture, "llama")
        self.assertTrue(str(self.model.path).endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
        self.assertEqual(self.model.vocab_size, 49152)
        self.assertGreaterEqual(self.tokenizer.vocab_size, 49152)
        self.assertIn(self.tokenizer.eos_token_id, self.tokenizer.eos_token_ids)
        self.assertIn("<|im_start|>", self.tokenizer.chat_template)

    def test_greedy_generate_equals_the_rust_api(self):
        if self.expected is None:
            self.skipTest("POCKETLM_TEST_EXPECTED is not set")
        e = self.expected
        prompt = chat_prompt(self.tokenizer, e["prompt"])
        text = pocketlm.generate(
            self.model, self.tokenizer, prompt, max_tokens=e["max_tokens"], temp=0.0
        )
        self.assertTrue(text.strip())
        self.assertEqual(text, e["text"])

    def test_stream_pieces_concatenate_to_the_generated_text(self):
        prompt = chat_prompt(self.tokenizer, "Write a haiku about the sea.")
        whole = pocketlm.generate(self.model, self.tokenizer, prompt, max_tokens=12, temp=0.0)
        responses = list(
            pocketlm.stream_generate(self.model, self.tokenizer, prompt, max_tokens=12, temp=0.0)
        )
        self.assertEqual("".join(r.text for r in responses), whole)
        last = responses[-1]
        self.assertEqual(last.finish_reason, "length")
        self.assertEqual(last.generation_tokens, 12)
        self.assertGreater(last.prompt_tokens, 5)
        self.assertGreater(last.generation_tps, 0.0)
        tokens = [r.token for r in responses if r.token is not None]
        self.assertEqual(len(tokens), 12)
        self.assertTrue(all(r.finish_reason is None for r in responses[:-1]))
        # The token ids decode to the same text.
        self.assertEqual(self.tokenizer.decode(tokens, skip_special_tokens=True), whole)

    def test_a_text_prompt_and_stop_strings(self):
        text = pocketlm.generate(
            self.model, self.tokenizer, "1, 2, 3, 4,", max_tokens=24, temp=0.0, stop=[" 7"]
        )
        self.assertTrue(text.startswith(" 5, 6,"), text)
        self.assertNotIn(" 7", text)

    def test_seeded_sampling_repeats(self):
        prompt = chat_prompt(self.tokenizer, "Tell me a story.")
        a = pocketlm.generate(self.model, self.tokenizer, prompt, max_tokens=16, temp=0.9, seed=7)
        b = pocketlm.generate(self.model, self.tokenizer, prompt, max_tokens=16, temp=0.9, seed=7)
        self.assertEqual(a, b)

    def test_chat_session_two_turns(self):
        chat = pocketlm.ChatSession(self.model, max_tokens=16, temp=0.0)
        first = chat.send("My name is Ada.")
        # The first turn is the one-shot answer to the same messages.
        alone = pocketlm.generate(
            self.model,
            self.tokenizer,
            chat_prompt(self.tokenizer, "My name is Ada."),
            max_tokens=16,
            temp=0.0,
        )
        self.assertEqual(first, alone)
        second = "".join(r.text for r in chat.stream("What is my name?"))
        self.assertTrue(second.strip())
        self.assertEqual(
            [m["role"] for m in chat.history], ["user", "assistant", "user", "assistant"]
        )
        self.assertEqual(chat.history[1]["content"], first)
        self.assertEqual(chat.history[3]["content"], second)
        chat.reset()
        self.assertEqual(chat.history, [])

    def test_tokenizer_round_trip(self):
        text = "Hello, world! Ünïcödé and emoji 🦀."
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        self.assertGreater(len(ids), 5)
        self.assertEqual(self.tokenizer.decode(ids), text)
        messages = [{"role": "user", "content": "Hi there"}]
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False)
        self.assertIsInstance(rendered, str)
        self.assertTrue(rendered.endswith("<|im_start|>assistant\n"), rendered)
        self.assertIn("Hi there", rendered)
        self.assertEqual(
            self.tokenizer.apply_chat_template(messages),
            self.tokenizer.encode(rendered, add_special_tokens=False),
        )
        no_prompt = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=False, tokenize=False
        )
        self.assertFalse(no_prompt.endswith("<|im_start|>assistant\n"))

    def test_errors_are_exceptions(self):
        with self.assertRaises(pocketlm.NotFoundError) as cm:
            pocketlm.load("/nonexistent/dir/model.gguf")
        self.assertIsInstance(cm.exception, FileNotFoundError)
        self.assertIsInstance(cm.exception, pocketlm.PocketLMError)
        self.assertIn("/nonexistent/dir/model.gguf", str(cm.exception))
        with self.assertRaises(ValueError) as cm:
            pocketlm.generate(self.model, self.tokenizer, "Hi", temp=-1.0)
        self.assertIsInstance(cm.exception, pocketlm.InvalidArgumentError)
        self.assertIn("temperature", str(cm.exception))
        with self.assertRaises(ValueError):
            pocketlm.generate(self.model, self.tokenizer, [], max_tokens=4)
        with self.assertRaises(pocketlm.InvalidArgumentError):
            list(pocketlm.stream_generate(self.model, self.tokenizer, "Hi", top_p=2.0))
        with self.assertRaises(ValueError) as cm:
            self.tokenizer.apply_chat_template([{"content": "no role"}])
        self.assertIn("messages[0]", str(cm.exception))
        with self.assertRaises(pocketlm.PocketLMError):
            self.tokenizer.decode([10**9])
        with self.assertRaises(FileNotFoundError):
            self.model.load_adapter("/nonexistent/adapter")
        with self.assertRaises(pocketlm.InvalidArgumentError):
            pocketlm.load(device="tpu")

    def test_generation_releases_the_gil(self):
        prompt = chat_prompt(self.tokenizer, "Write a long story about a dragon.")
        spans = {}

        def run(name):
            t0 = time.perf_counter()
            pocketlm.generate(self.model, self.tokenizer, prompt, max_tokens=16, temp=0.0)
            spans[name] = (t0, time.perf_counter())

        threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
        for t in threads:
            t.start()
        ticks = []
        while any(t.is_alive() for t in threads):
            ticks.append(time.perf_counter())
            time.sleep(0.001)  # resuming needs the GIL
        for t in threads:
            t.join()
        # This thread ran Python code while both generations were inside the library ...
        inside = [x for x in ticks if all(s + 0.01 < x < e - 0.01 for s, e in spans.values())]
        self.assertGreater(len(inside), 10, f"{len(ticks)} ticks, spans {spans}")
        # ... and the two generations overlapped in time (with the GIL held they would run
        # one after the other).
        (s1, e1), (s2, e2) = spans["a"], spans["b"]
        self.assertLess(max(s1, s2) + 0.03, min(e1, e2), spans)

    def test_convert_to_an_mlx_folder(self):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "mlx-q4")
            got = pocketlm.convert(mlx_path=out, quantize=True, q_group_size=32)
            self.assertEqual(str(got), out)
            with open(os.path.join(out, "config.json")) as f:
                config = json.load(f)
            self.assertEqual(config["quantization"], {"group_size": 32, "bits": 4})
            m, _ = pocketlm.load(out)
            self.assertEqual(m.architecture, "llama")
            with self.assertRaises(pocketlm.InvalidArgumentError):
                pocketlm.convert(mlx_path=out)

    def test_adapters_load_and_unload(self):
        if self.expected is None or ADAPTER is None:
            self.skipTest("POCKETLM_TEST_EXPECTED or POCKETLM_TEST_ADAPTER is not set")
        e = self.expected
        model, tokenizer = pocketlm.load(self.model.path)
        prompt = chat_prompt(tokenizer, e["prompt"])

        def greedy():
            return pocketlm.generate(model, tokenizer, prompt, max_tokens=e["max_tokens"], temp=0.0)

        self.assertEqual(model.unload_adapter(), 0)
        self.assertGreater(model.load_adapter(ADAPTER), 0)
        self.assertEqual(greedy(), e["adapter_text"])
        self.assertNotEqual(e["adapter_text"], e["text"])
        chat = pocketlm.ChatSession(model)
        with self.assertRaises(pocketlm.PocketLMError) as cm:
            model.unload_adapter()
        self.assertIn("in use", str(cm.exception))
        del chat
        self.assertGreater(model.unload_adapter(), 0)
        self.assertEqual(greedy(), e["text"])


def read_safetensors(path):
    """{name: (shape, flat list)} of a safetensors file's F32 and U32 tensors (no numpy)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a = array.array({"F32": "f", "U32": "I"}[t["dtype"]])
        start, end = t["data_offsets"]
        a.frombytes(data[start:end])
        if sys.byteorder == "big":
            a.byteswap()
        out[name] = (t["shape"], a.tolist())
    return out


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def norm(v):
    return math.sqrt(sum(x * x for x in v))


class EmbeddingTest(unittest.TestCase):
    """all-MiniLM-L6-v2 against sentence-transformers' embeddings of the same sentences."""

    @classmethod
    def setUpClass(cls):
        if MINILM is None:
            raise unittest.SkipTest("POCKETLM_TEST_MINILM is not set")
        cls.model = pocketlm.load_embedding(MINILM, device="cpu")
        with open(os.path.join(GOLDEN_DIR, "sentences.json")) as f:
            cls.sentences = json.load(f)
        (rows, dim), flat = read_safetensors(
            os.path.join(GOLDEN_DIR, "minilm.golden.safetensors")
        )["embeddings"]
        cls.golden = [flat[i * dim : (i + 1) * dim] for i in range(rows)]

    def test_embeddings_match_sentence_transformers(self):
        m = self.model
        self.assertEqual(m.dimension, 384)
        self.assertEqual(m.max_tokens, 256)
        self.assertTrue(m.normalizes)
        self.assertEqual(m.architecture, "bert")
        self.assertIn("EmbeddingModel bert (384 dimensions)", repr(m))
        # One text per forward pass: a batch pads every text to its longest (the last
        # sentence, 256 tokens), which costs seconds on two cores; the batch size does not
        # change the results beyond rounding (test_normalize_and_dimensions).
        got = m.embed(self.sentences, batch_size=1)
        self.assertEqual(len(got), len(self.golden))
        worst = 0.0
        for i, (g, w) in enumerate(zip(got, self.golden)):
            self.assertEqual(len(g), 384)
            self.assertIsInstance(g[0], float)
            self.assertGreaterEqual(cosine(g, w), 0.9999, f"sentence {i}")
            worst = max(worst, max(abs(x - y) for x, y in zip(g, w)))
        print(
            f"\nall-MiniLM-L6-v2 from Python: max abs diff {worst:.3e} over "
            f"{len(got)} sentences",
            file=sys.stderr,
        )
        self.assertLess(worst, 1e-4)

    def test_the_default_is_all_minilm_by_name(self):
        # None and the name resolve to the folder the test got (fetched into $POCKETLM_HOME).
        by_name = pocketlm.load_embedding("all-minilm-l6-v2", device="cpu")
        self.assertEqual(os.path.realpath(by_name.path), os.path.realpath(MINILM))
        self.assertEqual(
            os.path.realpath(pocketlm.load_embedding().path), os.path.realpath(MINILM)
        )
        self.assertEqual(by_name.embed(self.sentences[:2]), self.model.embed(self.sentences[:2]))

    def test_one_string_is_one_text(self):
        one = self.model.embed("A man is eating food.")
        self.assertEqual(len(one), 1)
        self.assertEqual(one, self.model.embed(["A man is eating food."]))
        self.assertGreaterEqual(cosine(one[0], self.golden[0]), 0.9999)
        self.assertEqual(self.model.embed([]), [])

    def test_normalize_and_dimensions(self):
        texts = self.sentences[:3]
        default = self.model.embed(texts)
        on = self.model.embed(texts, normalize=True)
        off = self.model.embed(texts, normalize=False)
        self.assertEqual(on, default)
        for v, raw in zip(on, off):
            self.assertAlmostEqual(norm(v), 1.0, places=5)
            n = norm(raw)
            self.assertGreater(abs(n - 1.0), 0.01, "an unnormalized vector")
            self.assertLess(max(abs(x - y / n) for x, y in zip(v, raw)), 1e-6)
        # The full dimension is accepted; MiniLM was not trained for shortened ones.
        self.assertEqual(self.model.embed(texts, dimensions=384), default)
        with self.assertRaises(pocketlm.InvalidArgumentError) as cm:
            self.model.embed(texts, dimensions=100)
        self.assertIsInstance(cm.exception, ValueError)
        self.assertIn("dimensions 100", str(cm.exception))
        with self.assertRaises(pocketlm.InvalidArgumentError):
            self.model.embed(texts, dimensions=0)
        # The batch size does not change the results beyond rounding.
        by_one = self.model.embed(texts, batch_size=1)
        for a, b in zip(by_one, default):
            self.assertLess(max(abs(x - y) for x, y in zip(a, b)), 1e-5)

    def test_bad_input_raises(self):
        with self.assertRaises(pocketlm.InvalidArgumentError) as cm:
            self.model.embed("x", batch_size=0)
        self.assertIn("batch_size", str(cm.exception))
        with self.assertRaises(TypeError):
            self.model.embed(None)
        with self.assertRaises(TypeError):
            self.model.embed(["ok", 3])
        with self.assertRaises(OverflowError):
            self.model.embed("x", dimensions=-1)
        with self.assertRaises(pocketlm.NotFoundError) as cm:
            pocketlm.load_embedding("/nonexistent/dir/embedder")
        self.assertIsInstance(cm.exception, FileNotFoundError)
        self.assertIn("/nonexistent/dir/embedder", str(cm.exception))
        with self.assertRaises(pocketlm.InvalidArgumentError):
            pocketlm.load_embedding(MINILM, device="tpu")
        # A folder that is not a model (the goldens' folder has no config.json).
        with self.assertRaises(pocketlm.PocketLMError) as cm:
            pocketlm.load_embedding(GOLDEN_DIR)
        self.assertIn("config.json", str(cm.exception))
        # A file (such as a chat model's .gguf) where a folder is expected.
        with self.assertRaises(pocketlm.PocketLMError) as cm:
            pocketlm.load_embedding(os.path.join(GOLDEN_DIR, "sentences.json"))
        self.assertIn("sentences.json: a file, not an embedding model folder", str(cm.exception))

    def test_embedding_releases_the_gil(self):
        texts = self.sentences[:19]  # the short ones, about 0.3 s
        span = {}

        def run():
            t0 = time.perf_counter()
            self.model.embed(texts)
            span["t"] = (t0, time.perf_counter())

        t = threading.Thread(target=run)
        t.start()
        ticks = []
        while t.is_alive():
            ticks.append(time.perf_counter())
            time.sleep(0.001)  # resuming needs the GIL
        t.join()
        s, e = span["t"]
        inside = [x for x in ticks if s + 0.01 < x < e - 0.01]
        self.assertGreater(len(inside), 5, f"{len(ticks)} ticks over {e - s:.3f} s")


if __name__ == "__main__":
    unittest.main()
