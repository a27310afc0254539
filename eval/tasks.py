"""Long-context tasks, generated here at a chosen token length, held in `datasets.Dataset` objects.

RULER-style synthetic tasks (templates after NVIDIA RULER, arXiv 2404.06654, without its in-context
examples), with real CPython text as the haystack where RULER uses essays:

| task | what is hidden / asked | answers | metric |
|---|---|---|---|
| niah_single | one "special magic number" for a key, in repeated noise sentences (RULER niah_single_1) | 1 number | string_match_recall |
| niah_single_docs | the same, in real docs prose (RULER niah_single_2, docs for essays) | 1 number | string_match_recall |
| niah_multikey | 4 needles with different keys; one is asked | 1 number | string_match_recall |
| niah_multivalue | 4 numbers for the same key; all are asked | 4 numbers | string_match_recall |
| niah_multiquery | 4 needles with different keys; all 4 are asked | 4 numbers | string_match_recall |
| vt | variable tracking: a chain of 5 assignments in noise text | 5 names | string_match_recall |
| cwe | common-word extraction: 10 words x 30 (fewer below 4k tokens) among words x 3 (past ~7k tokens also hyphenated word pairs), numbered | 10 words | string_match_recall |
| fwe | frequent-word extraction: Zipf-distributed coded words, top 3 asked | 3 words | string_match_recall |
| niah_single_story | niah_single's needle in narrative prose generated from sentence templates | 1 number | string_match_recall |
| niah_single_logs | the same in application log lines (timestamps, levels, components); the needle is a log line | 1 number | string_match_recall |
| niah_single_csv | the same in a CSV sales table; the needle is a row whose free-text note holds it | 1 number | string_match_recall |

The last three (FORMAT_TASKS) vary only the haystack, which text_sources generates from the sample's seed
(no outside text; no number there has 7 digits, so the needle's value occurs once). `_niah(variant,
haystack)` builds any needle variant (single, multikey, multivalue, multiquery) in any of HAYSTACKS.
The presets run the ten CORE_TASKS; ALL_TASKS adds FORMAT_TASKS (`flexicache eval --tasks ...`).

Question answering over long real text (extractive, one answer span each):

| task | context | question | metric |
|---|---|---|---|
| qa_code | stdlib modules' source | the literal assigned to a module-level constant | contains_match |
| qa_docs | language-reference topics (pydoc) | the right-hand side of a grammar rule | contains_match |

Every sample: `prompt` (the chat template of the model's tokenizer applied to the user message, plus the
RULER answer prefix at the start of the assistant turn), `answers`, `metric`, `max_new_tokens`, and
`prompt_tokens` (its exact length with this tokenizer, at most the requested length and nearly always
within 90% of it). Everything
is a pure function of (tokenizer, task, length, seed, sample index).
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import string
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from flexicache_hf.eval.text_sources import (
    CSV_CITIES, CSV_HEADER, CSV_PRODUCTS, CSV_STORES, LOG_COMPONENTS, STORY_NAMES, WORDS, csv_row, csv_rows,
    docs_corpus, docs_sections, log_lines, stdlib_sources, story_text,
)

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

RULER_TASKS = ("niah_single", "niah_single_docs", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
QA_TASKS = ("qa_code", "qa_docs")
CORE_TASKS = RULER_TASKS + QA_TASKS  # the ten tasks of the presets and of docs/accuracy.md's retention
# niah_single's needle in procedurally generated haystacks (text_sources: story_text, log_lines, csv_rows)
FORMAT_TASKS = ("niah_single_story", "niah_single_logs", "niah_single_csv")
ALL_TASKS = CORE_TASKS + FORMAT_TASKS


@dataclass
class Body:
    """What a task builder returns for one size: the user message, the answer prefix, the answers."""

    user: str
    answer_prefix: str
    answers: list[str]
    meta: dict


# ---------------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------------
def _golden_depth(index: int, lo: float = 0.05, hi: float = 0.95) -> float:
    """Depths spread evenly over samples (golden-ratio sequence), deterministic in the sample index."""
    return lo + (hi - lo) * ((0.5 + index * 0.6180339887) % 1.0)


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _cut_at_boundary(text: str, n_chars: int) -> str:
    """The first ~n_chars characters of text, ending at a sentence or line end."""
    if n_chars >= len(text):
        return text
    cut = max(text.rfind(". ", 0, n_chars), text.rfind("\n", 0, n_chars))
    return text[: cut + 1] if cut > n_chars // 2 else text[:n_chars]


def _insert_at_depths(haystack: str, items: list[str], depths: list[float]) -> str:
    """Insert each item at its depth (0..1) of the haystack, at the nearest sentence/line boundary."""
    spots = []
    for item, depth in zip(items, depths):
        pos = int(len(haystack) * depth)
        b = max(haystack.rfind(". ", 0, pos), haystack.rfind("\n", 0, pos))
        spots.append((b + 1 if b >= 0 else 0, item))
    out, last = [], 0
    for pos, item in sorted(spots, key=lambda s: s[0]):
        out.append(haystack[last:pos])
        sep_before = "" if (pos == 0 or haystack[pos - 1] in " \n") else " "
        out.append(f"{sep_before}{item} ")
        last = pos
    out.append(haystack[last:])
    return "".join(out)


def _distinct(rng: random.Random, pool, k: int) -> list:
    return rng.sample(list(pool), k)


# ---------------------------------------------------------------------------------------------------
# RULER needle tasks (haystack: the language-reference docs, shuffled per sample)
# ---------------------------------------------------------------------------------------------------
NIAH_TEMPLATE = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n{context}\n"
    "What {verb} the special magic {kind_q} for {query} mentioned in the provided text?"
)
NIAH_PREFIX = "The special magic {kind_q} for {query} mentioned in the provided text {verb}"
NEEDLE = "One of the special magic numbers for {key} is: {value}."


def _niah(variant: str, haystack_kind: str = "docs", n_needles: int = 4) -> Callable:
    if haystack_kind not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack_kind!r}; known: {', '.join(HAYSTACKS)}")

    def build(size: int, rng: random.Random, index: int) -> Body:
        r = random.Random(rng.random())  # same needles for every size of this sample
        keys = _distinct(r, WORDS, n_needles)
        values = [_number(r) for _ in range(n_needles)]
        order = r.randrange(1 << 30)
        d0 = _golden_depth(index)
        if variant == "single":
            needles, depths = [NEEDLE.format(key=keys[0], value=values[0])], [d0]
            query, answers = keys[0], [values[0]]
        elif variant == "multivalue":
            needles = [NEEDLE.format(key=keys[0], value=v) for v in values]
            depths = [r.uniform(0.05, 0.95) for _ in values]
            query, answers = keys[0], values
        else:  # multikey: ask one; multiquery: ask all
            needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
            depths = [d0] + [r.uniform(0.05, 0.95) for _ in values[1:]]
            if variant == "multikey":
                query, answers = keys[0], [values[0]]
            else:
                query, answers = ", ".join(keys[:-1]) + " and " + keys[-1], values
        plural = variant in ("multivalue", "multiquery")
        fields = dict(kind="numbers", kind_q="numbers" if plural else "number", verb="are" if plural else "is", query=query)
        context = HAYSTACKS[haystack_kind](size, order, needles, depths, random.Random(order))
        return Body(
            NIAH_TEMPLATE.format(context=context, **fields),
            NIAH_PREFIX.format(**fields),
            answers,
            {"keys": keys, "depths": [round(d, 3) for d in depths]},
        )

    return build


# ---------------------------------------------------------------------------------------------------
# haystacks of the needle tasks: (size in characters, seed, needles, depths, rng) -> context
# ---------------------------------------------------------------------------------------------------
def _noise_haystack(size, order, needles, depths, r) -> str:
    return _insert_at_depths(" ".join([NOISE] * max(1, size // (len(NOISE) + 1))), needles, depths)


def _docs_haystack(size, order, needles, depths, r) -> str:
    return _insert_at_depths(_cut_at_boundary(docs_corpus(order_seed=order), size), needles, depths)


def _story_haystack(size, order, needles, depths, r) -> str:
    """Narrative prose from templates (text_sources.story_text); the needle is one more sentence."""
    return _insert_at_depths(story_text(order, size), needles, depths)


def _insert_lines(lines: list[str], depths: list[float], render: Callable[[str | None, str], str], items) -> list[str]:
    """Each item rendered as a line (render(previous line, item)) and put before line int(depth * n)."""
    spots = sorted(((min(len(lines), int(len(lines) * d)), i) for i, d in enumerate(depths)))
    out, last = [], 0
    for at, i in spots:
        out += lines[last:at]
        out.append(render(out[-1] if out else None, items[i]))
        last = at
    return out + lines[last:]


def _log_haystack(size, order, needles, depths, r) -> str:
    """Application log lines (text_sources.log_lines); a needle is an INFO line whose message is the
    needle sentence, stamped with the time of the line before it."""
    lines = log_lines(order, size)

    def render(prev, needle):
        stamp = prev[:23] if prev else lines[0][:23]
        return f"{stamp} INFO  [{r.choice(LOG_COMPONENTS)}] {needle}"

    return "\n".join(_insert_lines(lines, depths, render, needles))


def _csv_haystack(size, order, needles, depths, r) -> str:
    """A sales table in CSV (text_sources.csv_rows, with its header); a needle is a row whose note is the
    needle sentence, dated like the row before it."""
    import datetime

    rows = csv_rows(order, max(1, size - len(CSV_HEADER) - 1))

    def render(prev, needle):
        t = datetime.datetime.strptime(",".join((prev or rows[0]).split(",")[:2]), "%Y-%m-%d,%H:%M")
        product, price = r.choice(CSV_PRODUCTS)
        customer = f"{r.choice(STORY_NAMES)} {r.choice('ABCDEFGHIJKLMNOPRSTVW')}."
        return csv_row(t, r.choice(CSV_STORES), r.choice(CSV_CITIES), product, r.randint(1, 12), price, customer, needle)

    return CSV_HEADER + "\n" + "\n".join(_insert_lines(rows, depths, render, needles))


HAYSTACKS: dict[str, Callable] = {"noise": _noise_haystack, "docs": _docs_haystack, "story": _story_haystack,
                                  "logs": _log_haystack, "csv": _csv_haystack}


# ---------------------------------------------------------------------------------------------------
# variable tracking (RULER vt: 1 chain, 4 hops, noise haystack)
# ---------------------------------------------------------------------------------------------------
def _vt(size: int, rng: random.Random, index: int, hops: int = 4) -> Body:
    r = random.Random(rng.random())
    names = set()
    while len(names) < hops + 1:
        names.add("".join(r.choices(string.ascii_uppercase, k=5)))
    names = sorted(names)
    r.shuffle(names)
    value = str(r.randint(10000, 99999))
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    reps = max(1, size // (len(NOISE) + 1))
    noise = " ".join([NOISE] * reps)
    # statements in order, at increasing depths
    depths = sorted(r.uniform(0.02, 0.98) for _ in statements)
    context = _insert_at_depths(noise, statements, depths)
    user = (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        f"{context}\nQuestion: Find all variables that are assigned the value {value} in the text above."
    )
    prefix = (
        f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
        f"are assigned the value {value}, they are:"
    )
    return Body(user, prefix, names, {"value": value, "depths": [round(d, 3) for d in depths]})


# ---------------------------------------------------------------------------------------------------
# common-word extraction (RULER cwe: 10 common words x 30, the rest x 3; fewer repeats when short)
# ---------------------------------------------------------------------------------------------------
def _cwe(size: int, rng: random.Random, index: int, n_common: int = 10, freq_common: int = 30, freq_rare: int = 3) -> Body:
    r = random.Random(rng.random())
    words = list(WORDS)
    r.shuffle(words)
    common, rare_pool = words[:n_common], words[n_common:]
    # size counts characters: ~9 characters per numbered entry. RULER's 30 repeats of each common word
    # (~40% of a 4k-token list) would not fit short lengths: fewer repeats there, never fewer than 4.
    n_entries = max(n_common * 4 + freq_rare, size // 9)
    freq_common = max(4, min(freq_common, int(0.4 * n_entries / n_common)))
    n_rare = max(1, (n_entries - n_common * freq_common) // freq_rare)
    if n_rare > len(rare_pool):
        # past ~7k tokens the word list runs out (RULER draws from a far larger vocabulary): add hyphenated
        # pairs of rare words, still 3 times each, so long lists keep the task's shape; shorter lists (and
        # their prompts) are exactly as before
        pairs = [f"{a}-{b}" for a in rare_pool for b in rare_pool if a != b]
        rare_pool = rare_pool + r.sample(pairs, min(len(pairs), n_rare - len(rare_pool)))
    n_rare = min(len(rare_pool), n_rare)
    seq = common * freq_common + rare_pool[:n_rare] * freq_rare
    r.shuffle(seq)
    context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(seq))
    user = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        f"Memorize the ones that appear most often.\n{context}\n"
        f"Question: What are the {n_common} most common words in the above list?"
    )
    prefix = f"Answer: The top {n_common} words that appear most often in the list are:"
    return Body(user, prefix, common, {"entries": len(seq), "rare_words": n_rare})


# ---------------------------------------------------------------------------------------------------
# frequent-word extraction (RULER fwe: coded words, Zipf alpha = 2, top 3 asked)
# ---------------------------------------------------------------------------------------------------
def _fwe(size: int, rng: random.Random, index: int, alpha: float = 2.0, vocab: int = 800) -> Body:
    r = random.Random(rng.random())
    coded = set()
    while len(coded) < vocab:
        coded.add("".join(r.choices(string.ascii_lowercase, k=6)))
    coded = sorted(coded)
    r.shuffle(coded)
    n_words = max(60, size // 7)
    zeta = sum(k ** -alpha for k in range(1, vocab + 1))
    counts = [int(n_words * (k ** -alpha) / zeta) for k in range(1, vocab + 1)]  # RULER: rare words drop out
    # the top 3 must be strictly ahead of the 4th (ties make the answer ambiguous)
    counts[2] = max(counts[2], counts[3] + 2)
    counts[1] = max(counts[1], counts[2] + 2)
    counts[0] = max(counts[0], counts[1] + 2)
    seq = [w for w, c in zip(coded, counts) for _ in range(c)]
    r.shuffle(seq)
    seq = seq[: max(n_words, sum(counts[:4]))]
    top = sorted(set(seq), key=lambda w: -seq.count(w))[:4]
    if len({seq.count(w) for w in top}) < 4:  # truncation made a tie: fall back to the full sequence
        seq = [w for w, c in zip(coded, counts) for _ in range(c)]
        r.shuffle(seq)
    counter = {}
    for w in seq:
        counter[w] = counter.get(w, 0) + 1
    answers = sorted(counter, key=lambda w: -counter[w])[:3]
    context = " ".join(seq)
    user = (
        "Read the following coded text and track the frequency of each coded word. Find the three most "
        f"frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. What are the "
        "three most frequently appeared words in the above coded text?"
    )
    prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
    return Body(user, prefix, answers, {"counts": [counter[w] for w in answers], "words": len(seq)})


# ---------------------------------------------------------------------------------------------------
# QA over the standard library's source: the literal of a module-level constant
# ---------------------------------------------------------------------------------------------------
def _constants(source: str) -> list[tuple[str, str]]:
    """(NAME, literal source) of module-level `NAME = <str/int/float literal>` assignments."""
    out = []
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return out
    for node in tree.body:
        if (
            isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, (str, int, float))
            and not isinstance(node.value.value, bool)
        ):
            name = node.targets[0].id
            literal = ast.get_source_segment(source, node.value) or ""
            if name.isupper() and len(name) >= 4 and 2 <= len(literal) <= 24 and "\n" not in literal:
                out.append((name, literal))
    return out


def _assign_count(name: str, text: str) -> int:
    return len(re.findall(rf"(?m)^\s*{re.escape(name)}\s*=", text))


@lru_cache(maxsize=1)
def _code_candidates() -> tuple[tuple[str, str, str], ...]:
    """(file, NAME, literal) of constants assigned exactly once across every file we use."""
    sources = stdlib_sources()
    candidates = [(rel, name, lit) for rel, src in sources for name, lit in _constants(src)]
    counts = {}
    for _, name, _ in candidates:
        counts[name] = counts.get(name, 0) + 1
    return tuple(c for c in candidates if counts[c[1]] == 1 and sum(_assign_count(c[1], s) for _, s in sources) == 1)


def _qa_code(size: int, rng: random.Random, index: int) -> Body:
    r = random.Random(rng.random())
    sources = list(stdlib_sources())
    candidates = _code_candidates()
    rel, name, literal = candidates[r.randrange(len(candidates))]
    target_src = dict(sources)[rel]
    # the target file's chunk holding the assignment (up to ~1/3 of the budget), the rest other files
    pos = re.search(rf"(?m)^\s*{re.escape(name)}\s*=", target_src).start()
    chunk_len = max(400, size // 3)
    start = max(0, min(pos - r.randrange(max(1, chunk_len - 200)), len(target_src) - chunk_len))
    start = target_src.rfind("\n", 0, start) + 1
    end = target_src.find("\n", start + chunk_len)
    chunk = target_src[start: end if end > 0 else len(target_src)]
    if name not in chunk:  # tiny budgets: center on the assignment
        start = target_src.rfind("\n", 0, max(0, pos - 200)) + 1
        chunk = target_src[start: target_src.find("\n", pos + 200)]
    others = [(rel2, s) for rel2, s in sources if rel2 != rel]
    r.shuffle(others)
    parts, used = [], len(chunk)
    for rel2, s in others:
        if size - used < 200:  # no tiny fragments
            break
        piece = _cut_at_boundary(s, size - used)
        parts.append(f"# File: Lib/{rel2}\n{piece}")
        used += len(parts[-1]) + 2
    depth = _golden_depth(index)
    at = min(len(parts), int(round(depth * len(parts))))
    parts.insert(at, f"# File: Lib/{rel}\n{chunk}")
    context = "\n\n".join(parts)
    if len(context) > size:  # trim the other files' tail, never the target chunk
        over = len(context) - size
        last = len(parts) - 1 if at != len(parts) - 1 else len(parts) - 2
        if last >= 0 and over < len(parts[last]):
            parts[last] = _cut_at_boundary(parts[last], len(parts[last]) - over)
            context = "\n\n".join(parts)
    assert _assign_count(name, context) == 1
    user = (
        "Below is the source code of several modules of the Python standard library.\n\n"
        f"{context}\n\nQuestion: In the code above, what literal value is assigned to the module-level constant "
        f"{name}? Answer with the value only."
    )
    prefix = f"{name} ="
    return Body(user, prefix, [literal], {"file": rel, "constant": name, "depth": round(depth, 3)})


# ---------------------------------------------------------------------------------------------------
# QA over the language reference: the right-hand side of a grammar rule
# ---------------------------------------------------------------------------------------------------
_RULE = re.compile(r"(?m)^\s+([a-z_]+)\s+::=\s+(.+)$")


def _rules(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2).strip()) for m in _RULE.finditer(text)]


@lru_cache(maxsize=1)
def _docs_candidates() -> tuple[tuple[int, str, str], ...]:
    """(section index, rule, right-hand side): single-line rules defined once in all the docs."""
    sections = docs_sections()
    lhs_count = {}
    for _, text in sections:
        for lhs, _ in _rules(text):
            lhs_count[lhs] = lhs_count.get(lhs, 0) + 1
    candidates = []
    for si, (_, text) in enumerate(sections):
        for m in _RULE.finditer(text):
            lhs, rhs = m.group(1), m.group(2).strip()
            nxt = text[m.end() + 1:].split("\n", 1)[0]  # the next line must not continue the rule
            if lhs_count[lhs] == 1 and 8 <= len(rhs) <= 60 and not nxt.lstrip().startswith(("|", "(")):
                candidates.append((si, lhs, rhs))
    return tuple(candidates)


def _qa_docs(size: int, rng: random.Random, index: int) -> Body:
    r = random.Random(rng.random())
    sections = list(docs_sections())
    candidates = _docs_candidates()
    si, lhs, rhs = candidates[r.randrange(len(candidates))]
    target = sections[si][1]
    if len(target) > size // 2:  # keep the part of a long section around the rule
        pos = target.find(f"{lhs} ::=")
        start = target.rfind("\n\n", 0, max(0, pos - size // 4)) + 1
        target = target[start:start + size // 2]
        if f"{lhs} ::=" not in target.replace("  ", " "):
            target = sections[si][1][max(0, pos - 200): pos + 400]
    others = [text for j, (_, text) in enumerate(sections) if j != si]
    r.shuffle(others)
    parts, used = [], len(target)
    for text in others:
        if size - used < 200:  # no tiny fragments
            break
        parts.append(_cut_at_boundary(text, size - used))
        used += len(parts[-1]) + 2
    at = min(len(parts), int(round(_golden_depth(index) * len(parts))))
    parts.insert(at, target)
    context = "\n\n".join(parts)
    user = (
        "Below are sections of the Python language reference.\n\n"
        f"{context}\n\nQuestion: According to the documentation above, what is the grammar rule that defines "
        f"{lhs}? Give its right-hand side."
    )
    prefix = f"{lhs} ::="
    return Body(user, prefix, [rhs], {"rule": lhs, "section": sections[si][0]})


# ---------------------------------------------------------------------------------------------------
# registry and sizing
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    name: str
    build: Callable[[int, random.Random, int], Body]
    metric: str  # "string_match_recall" | "contains_match"
    max_new_tokens: int
    chars_per_token: float  # first guess for sizing


TASKS: dict[str, TaskSpec] = {
    "niah_single": TaskSpec("niah_single", _niah("single", "noise"), "string_match_recall", 24, 4.5),
    "niah_single_docs": TaskSpec("niah_single_docs", _niah("single"), "string_match_recall", 24, 4.2),
    "niah_multikey": TaskSpec("niah_multikey", _niah("multikey"), "string_match_recall", 24, 4.2),
    "niah_multivalue": TaskSpec("niah_multivalue", _niah("multivalue"), "string_match_recall", 64, 4.2),
    "niah_multiquery": TaskSpec("niah_multiquery", _niah("multiquery"), "string_match_recall", 64, 4.2),
    "vt": TaskSpec("vt", _vt, "string_match_recall", 40, 4.0),
    "cwe": TaskSpec("cwe", _cwe, "string_match_recall", 64, 2.5),
    "fwe": TaskSpec("fwe", _fwe, "string_match_recall", 40, 2.4),
    "qa_code": TaskSpec("qa_code", _qa_code, "contains_match", 24, 3.2),
    "qa_docs": TaskSpec("qa_docs", _qa_docs, "contains_match", 32, 4.0),
    "niah_single_story": TaskSpec("niah_single_story", _niah("single", "story"), "string_match_recall", 24, 4.3),
    "niah_single_logs": TaskSpec("niah_single_logs", _niah("single", "logs"), "string_match_recall", 24, 2.6),
    "niah_single_csv": TaskSpec("niah_single_csv", _niah("single", "csv"), "string_match_recall", 24, 2.6),
}


def format_prompt(tokenizer, user: str, answer_prefix: str, chat: bool = True) -> str:
    """The model's chat template around the user message, the answer prefix opening the assistant turn."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        return text + answer_prefix
    return f"{user}\n{answer_prefix}"


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_sample(tokenizer, task: str, length: int, seed: int, index: int, chat: bool = True) -> dict:
    """One sample of `task` whose prompt is at most `length` tokens (aiming at >= 90% of it, never < 80%)."""
    spec = TASKS[task]
    base = int(hashlib.sha256(f"{task}|{seed}|{index}".encode()).hexdigest()[:12], 16)

    def build(size: int):
        body = spec.build(size, random.Random(base), index)
        prompt = format_prompt(tokenizer, body.user, body.answer_prefix, chat)
        return body, prompt, _count(tokenizer, prompt)

    # size (characters of context) -> tokens is monotone up to noise: secant steps until the target is
    # bracketed, then bisection; keep the longest prompt that fits
    size = int(length * spec.chars_per_token)
    best, lo, hi = None, None, None
    for _ in range(20):
        body, prompt, n = build(size)
        if n <= length:
            lo = size if lo is None else max(lo, size)
            if best is None or n > best[2]:
                best = (body, prompt, n)
            if n >= 0.9 * length:
                break
        else:
            hi = size if hi is None else min(hi, size)
        if lo is not None and hi is not None:
            if hi - lo <= 1:
                break
            size = (lo + hi) // 2
        else:
            size = max(64, int(size * (0.95 * length) / max(n, 1)))
    if best is None or best[2] < 0.8 * length:
        got = best[2] if best else n
        raise RuntimeError(f"{task}: could not fit a prompt of ~{length} tokens (got {got}); try another length")
    body, prompt, n = best
    return {
        "task": task,
        "sample": index,
        "length": length,
        "prompt": prompt,
        "prompt_tokens": n,
        "answers": list(body.answers),
        "answer_prefix": body.answer_prefix,
        "metric": spec.metric,
        "max_new_tokens": spec.max_new_tokens,
        "meta": json.dumps(body.meta, sort_keys=True),
    }


def build_dataset(tokenizer, tasks=ALL_TASKS, lengths=(4096,), samples: int = 3, seed: int = 0, chat: bool = True):
    """A `datasets.Dataset` with `samples` samples of each task at each length (rows ordered task, length, sample)."""
    import datasets

    rows = []
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        for length in lengths:
            for i in range(samples):
                rows.append(make_sample(tokenizer, task, length, seed, i, chat))
    return datasets.Dataset.from_list(rows)


def dataset_fingerprint(ds) -> str:
    h = hashlib.sha256()
    for row in ds:
        h.update(row["prompt"].encode())
        h.update(json.dumps(row["answers"]).encode())
    return h.hexdigest()[:16]
