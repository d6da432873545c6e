#!/usr/bin/env python3
"""Builds the small fine-tuning data set `data/stdlib-docs/` from text that Python ships: the
first sentence of the docstrings of public functions in a fixed list of standard-library
modules, as prompt/completion records (mlx-lm's `CompletionsDataset` format):

    {"prompt": "In Python, what does os.path.join do?", "completion": "Join two or more pathname components, inserting '/' as needed."}

Deterministic for a given Python version (the committed files came from CPython 3.11.7):
records are sorted, shuffled with a fixed seed and split 80/10/10 into train/valid/test.jsonl.

Run: python3 scripts/data/build_stdlib_docs.py [--out data/stdlib-docs]
"""

import argparse
import importlib
import inspect
import json
import os
import random
import re

MODULES = [
    "os", "os.path", "shutil", "glob", "fnmatch", "json", "re", "math", "cmath", "statistics",
    "random", "string", "textwrap", "difflib", "itertools", "functools", "operator",
    "collections", "heapq", "bisect", "copy", "pprint", "datetime", "time", "calendar",
    "base64", "binascii", "hashlib", "hmac", "zlib", "gzip", "bz2", "lzma", "zipfile",
    "tarfile", "csv", "configparser", "tempfile", "io", "pathlib", "urllib.parse",
    "html", "shlex", "socket", "select", "subprocess", "threading", "queue", "sched",
    "signal", "struct", "codecs", "unicodedata", "locale", "gettext", "logging", "warnings",
    "inspect", "dis", "types", "typing", "abc", "contextlib", "enum", "dataclasses",
    "secrets", "uuid", "platform", "sys", "builtins", "keyword", "token", "tokenize",
    "ast", "pickle", "marshal", "shelve", "sqlite3", "email.utils", "mimetypes",
    "ipaddress", "colorsys", "fractions", "decimal", "numbers", "array", "weakref",
    "gc", "traceback", "linecache", "filecmp", "stat", "getpass", "quopri", "uu",
]


def first_sentence(doc):
    para = doc.strip().split("\n\n")[0]
    text = " ".join(para.split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return m.group(1) if m else text


def records():
    seen = set()
    out = []
    for modname in MODULES:
        try:
            mod = importlib.import_module(modname)
        except Exception:
            continue
        for name in sorted(dir(mod)):
            if name.startswith("_"):
                continue
            obj = getattr(mod, name, None)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            s = first_sentence(doc)
            # Skip signatures-as-docs ("foo(a, b) -> c"), very short and very long ones.
            if "(" in s.split(" ")[0] or "->" in s or not 30 <= len(s) <= 160:
                continue
            if not s[0].isupper():
                continue
            full = "builtins" == modname and name or f"{modname}.{name}"
            if s in seen:
                continue
            seen.add(s)
            out.append({"prompt": f"In Python, what does {full} do?", "completion": s})
    return sorted(out, key=lambda r: r["prompt"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "../../data/stdlib-docs"))
    args = ap.parse_args()
    recs = records()
    random.Random(7).shuffle(recs)
    n = len(recs)
    n_valid = n_test = n // 10
    splits = {
        "valid": recs[:n_valid],
        "test": recs[n_valid:n_valid + n_test],
        "train": recs[n_valid + n_test:],
    }
    os.makedirs(args.out, exist_ok=True)
    for split, rs in splits.items():
        with open(os.path.join(args.out, f"{split}.jsonl"), "w") as f:
            for r in rs:
                f.write(json.dumps(r) + "\n")
        print(f"{split}: {len(rs)} records")


if __name__ == "__main__":
    main()
