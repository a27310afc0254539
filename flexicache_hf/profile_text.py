"""The profiling corpus: long real text that ships with CPython, cut into token windows; nothing is downloaded.

`cpython_text_windows` gives the prompts (and, teacher-forced, the decode inputs) that `flexicache profile`
records head stability on: "prose" is the docstrings of large pure-Python standard-library modules (plus
LICENSE.txt), "code" their source. Windows are deterministic in the seed, so a profile's recorded command
rebuilds its prompts on the same Python version.

Not the accuracy harness's text (`flexicache_hf.eval.text_sources`: pydoc topics and a different list of
modules): the shipped measured profiles (SmolLM2, Qwen2.5-Coder) record these documents by name, and this
corpus keeps them reproducible.
"""

from __future__ import annotations

import ast
import os
import random
import sysconfig
from dataclasses import dataclass
from functools import lru_cache

import torch

# Large pure-Python stdlib modules: their docstrings are the prose corpus, their source the code corpus.
# Files missing in a given Python version are skipped (the data description lists what was used).
_STDLIB_FILES = (
    "argparse.py", "ast.py", "asyncio/base_events.py", "asyncio/events.py", "asyncio/streams.py",
    "asyncio/tasks.py", "calendar.py", "collections/__init__.py", "concurrent/futures/_base.py",
    "configparser.py", "contextlib.py", "csv.py", "dataclasses.py", "datetime.py", "_pydatetime.py",
    "difflib.py", "doctest.py", "email/_header_value_parser.py", "email/message.py", "enum.py",
    "fractions.py", "ftplib.py", "functools.py", "http/client.py", "http/server.py", "imaplib.py",
    "inspect.py", "ipaddress.py", "logging/__init__.py", "logging/handlers.py", "mailbox.py",
    "multiprocessing/pool.py", "optparse.py", "os.py", "pathlib.py", "pathlib/_local.py", "pickle.py",
    "pprint.py", "_pydecimal.py", "pydoc.py", "random.py", "shutil.py", "smtplib.py", "socket.py",
    "ssl.py", "statistics.py", "subprocess.py", "tarfile.py", "tempfile.py", "textwrap.py",
    "threading.py", "tokenize.py", "traceback.py", "typing.py", "unittest/case.py", "unittest/mock.py",
    "urllib/parse.py", "urllib/request.py", "uuid.py", "warnings.py", "zipfile.py", "zipfile/__init__.py",
)


def _docstrings(source: str) -> str:
    """The docstrings of a module, its classes and functions, in source order, each under its name."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(doc)
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 80:
                kind = "class" if isinstance(node, ast.ClassDef) else "def"
                parts.append((node.lineno, f"{kind} {node.name}:\n{doc}"))
    head = [p for p in parts if isinstance(p, str)]
    body = [p[1] for p in sorted((p for p in parts if not isinstance(p, str)), key=lambda p: p[0])]
    return "\n\n".join(head + body)


@lru_cache(maxsize=2)
def cpython_documents(kind: str) -> tuple[tuple[str, str], ...]:
    """(name, text) documents from the running CPython: kind "prose" (docstrings of each module in
    _STDLIB_FILES, plus LICENSE.txt) or "code" (the modules' source)."""
    if kind not in ("prose", "code"):
        raise ValueError(f"kind must be 'prose' or 'code', got {kind!r}")
    stdlib = sysconfig.get_paths()["stdlib"]
    docs = []
    for rel in _STDLIB_FILES:
        path = os.path.join(stdlib, rel)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            src = f.read()
        text = src if kind == "code" else _docstrings(src)
        if len(text) > 4000:
            docs.append((f"stdlib:{rel}" + ("" if kind == "code" else ":docstrings"), text))
    lic = os.path.join(stdlib, "LICENSE.txt")
    if kind == "prose" and os.path.isfile(lic):
        with open(lic, encoding="utf-8") as f:
            docs.append(("stdlib:LICENSE.txt", f.read()))
    if not docs:
        raise RuntimeError(f"No CPython source files found under {stdlib}")
    return tuple(docs)


@dataclass
class TextWindow:
    name: str  # document, e.g. "stdlib:argparse.py:docstrings" (several joined with " + ")
    kind: str
    char_offset: int
    input_ids: torch.Tensor  # [prompt_tokens + continuation_tokens] int64


def cpython_text_windows(
    tokenizer, samples: int, num_tokens: int, seed: int = 0, data: str = "mixed"
) -> list[TextWindow]:
    """`samples` windows of exactly `num_tokens` tokens of CPython's own text, deterministic in `seed`.

    data: "prose" (stdlib docstrings, LICENSE), "code" (stdlib source) or "mixed" (alternating, prose
    first). Each window starts at a line start of a randomly chosen document and position; a document
    shorter than the window continues into the next ones (documents in a seeded random order).
    """
    if data not in ("mixed", "prose", "code"):
        raise ValueError(f"data must be 'mixed', 'prose' or 'code', got {data!r}")
    rng = random.Random(seed)
    out = []
    for i in range(samples):
        kind = data if data != "mixed" else ("prose", "code")[i % 2]
        docs = list(cpython_documents(kind))
        rng.shuffle(docs)
        name, text = docs[0]
        start = rng.randrange(max(1, len(text) - 2000))
        start = text.rfind("\n", 0, start) + 1
        names, body, rest = [name], text[start:], docs[1:]
        while True:
            # tokenize only a window: the whole corpus is megabytes
            ids = tokenizer(body[: num_tokens * 8], add_special_tokens=False)["input_ids"]
            if len(ids) >= num_tokens:
                break
            if len(body) > num_tokens * 8:  # more than 8 characters a token: tokenize everything
                ids = tokenizer(body, add_special_tokens=False)["input_ids"]
                if len(ids) >= num_tokens:
                    break
            if not rest:
                raise RuntimeError(f"CPython's {kind} text is too short for {num_tokens}-token windows")
            nxt, rest = rest[0], rest[1:]
            names.append(nxt[0])
            body += "\n\n" + nxt[1]
        out.append(TextWindow(" + ".join(names), kind, start, torch.tensor(ids[:num_tokens], dtype=torch.long)))
    return out
