"""Head-stability profiling: which KV heads must re-select their pages every decode step.

Owns the offline procedure of REFERENCE.md section 3, from recording to the shipped `HeadProfile`:

1. Recording (`record_stability`): run a Hugging Face causal LM on long real text with a registered
   attention function ("flexicache_profile") that computes plain attention over a DynamicCache and, at
   every decode step (one query token), writes down per (layer, KV head) the top-K page set S(t) by two
   scores over the candidate pages (every page before the page of the newest token: the current, partly
   filled page is always selected by the cache, so it is no candidate):
     - "attention": exact attention mass of the page = softmax probabilities summed over the page's
       tokens, then SUMMED over the query heads of the KV head's GQA group (the group's total mass: the
       mass the whole group loses when the page is left out). `group_reduce="max"` takes the max instead.
     - "minmax": the Quest MinMax upper bound the cache ranks with (REFERENCE.md section 4), computed by
       `ops.page_scores_ref` over `ops.page_minmax_ref` of the cached (post-RoPE) keys: max over the group.
   The prompts are windows of real text that ships with CPython (`cpython_text_windows`): docstrings of
   the standard library (prose) and its source files (code), plus LICENSE.txt when present; nothing is
   downloaded. By default the continuation is teacher-forced (the next tokens of the same text, fed one
   at a time as decode steps), so the decode steps follow real text instead of greedy loops.
2. Stability (`rco`, `temporal_stability`), exactly as REFERENCE.md section 3:
   RCO(s,t) = max(0, (|S(s) ∩ S(t)|/K - K/N(t)) / (1 - K/N(t))), TS(s) = mean over t = s+1..s+W-1 of
   RCO(s,t) for chunks of W = 16 steps starting at 0, 16, 32, ...; instability = 1 - TS. Only steps with
   N(t) > K count (N(t) = candidate pages at step t); the chunk's reference step s must count too (with
   N(s) <= K, S(s) is every page, not a top-K), else the chunk is skipped.
3. Classification (`classify_heads`): per chunk the M least stable heads form its unstable set; heads
   are ranked by how many chunks (over all samples) put them in it (ties: higher mean instability
   first), and the top M form the profile. Held-out recall@M: see `classify_heads`.
4. `profile_model` = recording + classification -> `HeadProfile` with its evidence in the metadata;
   `plot_stability_heatmap` and `plot_rco_curves` draw it (matplotlib, Agg backend).
"""

from __future__ import annotations

import ast
import contextlib
import math
import os
import platform
import random
import sysconfig
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Sequence

import torch

from flexicache_hf.ops import page_minmax_ref, page_scores_ref
from flexicache_hf.profiles import HeadProfile

ATTN_NAME = "flexicache_profile"
WINDOW = 16
METHODS = ("attention", "minmax")


def _tool_version() -> str:
    import flexicache_hf

    return getattr(flexicache_hf, "__version__", None) or "0.1.0"


# ================================================================================================
# RCO and TS
# ================================================================================================
def rco(S_s: torch.Tensor, S_t: torch.Tensor, K: int, N_t) -> torch.Tensor:
    """Random-corrected overlap of top-K page sets, RCO(s,t) = max(0, (|S(s)∩S(t)|/K - K/N(t)) / (1 - K/N(t))).

    S_s, S_t: either page-index sets [..., K] (int; entries < 0 are padding and never match; entries of a
    set must be distinct) or membership masks [..., P] (bool). They broadcast against each other.
    N_t: pages at the later step (int or tensor broadcastable to the leading dims). Returns float32 [...];
    NaN where N_t <= K (the step does not count: a top-K of at most K pages is every page).
    """
    if S_s.dtype == torch.bool:
        inter = (S_s & S_t).sum(-1)
    else:
        a, b = S_s.unsqueeze(-1), S_t.unsqueeze(-2)
        inter = ((a == b) & (a >= 0)).any(-1).sum(-1)
    N = torch.as_tensor(N_t, dtype=torch.float32, device=inter.device)
    base = K / N.clamp(min=1)
    val = ((inter.float() / K - base) / (1 - base)).clamp(min=0)
    return torch.where(N > K, val, torch.full_like(val, float("nan")))


def temporal_stability(S: torch.Tensor, N: torch.Tensor, K: int, window: int = WINDOW, drop_last: bool = True) -> torch.Tensor:
    """TS of every chunk: TS(s) = mean over t = s+1 .. s+W-1 of RCO(s, t), chunks starting at 0, W, 2W, ...

    S: top-K sets of consecutive decode steps, [steps, *heads, K] (int, -1 padding) or [steps, *heads, P]
    (bool); N: [steps] pages at each step (or broadcastable to [steps, *heads]). Only steps with N > K
    count: a t with N(t) <= K is left out of the mean, and a chunk whose start s has N(s) <= K (or with no
    counting t) gets NaN. drop_last: ignore a trailing chunk shorter than W (else it is averaged over the
    steps it has). Returns float32 [chunks, *heads].
    """
    steps = S.shape[0]
    N = torch.as_tensor(N, dtype=torch.float32)
    if N.dim() == 0:
        N = N.expand(steps)
    out = []
    for s in range(0, steps, window):
        e = min(s + window, steps)
        if e - s < window and (drop_last or e - s < 2):
            break
        r = rco(S[s : s + 1], S[s + 1 : e], K, _bcast(N[s + 1 : e], S.dim() - 2))  # [e-s-1, *heads]
        ts = r.nanmean(0) if r.shape[0] else torch.full(S.shape[1:-1], float("nan"))
        ref_counts = _bcast(N[s : s + 1], S.dim() - 2)[0] > K
        out.append(torch.where(ref_counts, ts, torch.full_like(ts, float("nan"))))
    if not out:
        return torch.empty((0, *S.shape[1:-1]))
    return torch.stack(out)


def _bcast(n: torch.Tensor, head_dims: int) -> torch.Tensor:
    """[steps] -> [steps, 1, ..., 1] so that it broadcasts against [steps, *heads]."""
    return n.reshape(n.shape + (1,) * (head_dims - (n.dim() - 1)))


def rco_by_offset(S: torch.Tensor, N: torch.Tensor, K: int, max_offset: int) -> torch.Tensor:
    """Mean over reference steps s of RCO(s, s+d), for d = 1..max_offset: float32 [max_offset, *heads].

    The RCO-vs-distance curve of the paper's Figure 1 (steps with N <= K left out, as in TS).
    """
    steps = S.shape[0]
    N = torch.as_tensor(N, dtype=torch.float32)
    out = []
    for d in range(1, max_offset + 1):
        if d >= steps:
            out.append(torch.full(S.shape[1:-1], float("nan")))
            continue
        r = rco(S[:-d], S[d:], K, _bcast(N[d:], S.dim() - 2))
        ok = _bcast(N[:-d], S.dim() - 2) > K
        out.append(torch.where(ok, r, torch.full_like(r, float("nan"))).nanmean(0))
    return torch.stack(out)


# ================================================================================================
# classification
# ================================================================================================
def resolve_count(unstable: int | float, total_heads: int) -> int:
    """M from an int count (1..total) or a fraction in (0, 1] of all KV heads (rounded half up, at least 1).

    A float that is a whole number >= 1 (e.g. 64.0) is a count.
    """
    if isinstance(unstable, bool):
        raise ValueError(f"unstable must be a count or a fraction, got {unstable!r}")
    if isinstance(unstable, float) and unstable > 1 and unstable.is_integer():
        unstable = int(unstable)
    if isinstance(unstable, int):
        if not 1 <= unstable <= total_heads:
            raise ValueError(f"unstable={unstable} heads is out of range: the model has {total_heads} KV heads")
        return unstable
    if not 0 < unstable <= 1:
        raise ValueError(f"unstable={unstable!r}: give a count of heads (int) or a fraction in (0, 1], e.g. 0.25")
    return max(1, min(total_heads, math.floor(unstable * total_heads + 0.5)))


def _rank(freq: torch.Tensor, tie: torch.Tensor) -> list[int]:
    """Flat head indices by frequency, ties by `tie` (both descending), then by index."""
    f, t = freq.tolist(), torch.nan_to_num(tie, nan=-1.0).tolist()
    return sorted(range(len(f)), key=lambda i: (-f[i], -t[i], i))


def chunk_unstable_sets(instability: torch.Tensor, M: int) -> torch.Tensor:
    """Per chunk, the M heads of highest instability: bool [C, heads] from instability [C, heads].

    Chunks without a value (all NaN: no counting step) are dropped by the caller; NaN heads never enter a
    set. Ties go to the lower head index (stable sort).
    """
    x = torch.nan_to_num(instability.float(), nan=-math.inf)
    order = torch.sort(-x, dim=-1, stable=True).indices[..., :M]
    sets = torch.zeros_like(x, dtype=torch.bool)
    sets.scatter_(-1, order, True)
    return sets


@dataclass
class Classification:
    """Result of `classify_heads`; head indices are flat (layer * num_kv_heads + kv_head)."""

    M: int
    unstable: list[int]  # the consensus: top M heads by selection frequency over all chunks
    frequency: torch.Tensor  # [heads] fraction of chunks whose unstable set holds the head
    instability: torch.Tensor  # [heads] mean 1-TS over all chunks
    chunks: int
    heldout_recall: float  # mean over odd chunks of |consensus(even chunks) ∩ U_c| / M
    heldout_recall_min: float
    heldout_recall_swapped: float  # the same with the halves swapped (consensus on odd, tested on even)
    heldout_consensus_overlap: float  # |consensus(even) ∩ consensus(odd)| / M
    insample_recall: float  # mean over all chunks of |consensus ∩ U_c| / M: no fixed M-set does better here
    chance_recall: float  # what a random set of M heads recalls on average: M / heads


def classify_heads(instability: Sequence[torch.Tensor] | torch.Tensor, unstable: int | float = 0.25) -> Classification:
    """Consensus unstable set and its held-out recall@M, from per-chunk instability.

    instability: one tensor per sample, [chunks, heads] (1 - TS, NaN for chunks that do not count; any
    head shape is flattened), or one tensor [samples, chunks, heads].

    Per chunk c, U_c = the M heads of highest instability in that chunk. Over all chunks of all samples,
    freq(h) = #{c : h in U_c} / #chunks; the consensus is the M heads of highest freq (ties: higher mean
    instability, then lower index).

    Held-out recall@M: chunk c of a sample is "even" if its index within the sample (0, 1, 2, ...) is even.
    The consensus C_even is built as above from the even chunks only; for every odd chunk c,
    recall_c = |C_even ∩ U_c| / M (both sets hold M heads, so it is also the precision), and
    heldout_recall is the mean of recall_c over the odd chunks of all samples (heldout_recall_min their
    minimum). A random M-set scores M / heads on average (chance_recall). heldout_recall_swapped repeats it
    with the halves swapped; heldout_consensus_overlap = |C_even ∩ C_odd| / M. insample_recall is the
    full consensus's mean recall over all chunks: the top-M by frequency maximises it over all M-sets, so it
    bounds what any fixed profile can recall of these chunks (per-chunk noise caps held-out recall too).
    """
    per_sample = list(instability) if not isinstance(instability, torch.Tensor) or instability.dim() == 3 else [instability]
    per_sample = [x.reshape(x.shape[0], -1).float() for x in per_sample]
    heads = per_sample[0].shape[1]
    M = resolve_count(unstable, heads)
    rows, parity = [], []
    for x in per_sample:
        for c in range(x.shape[0]):
            if not torch.isnan(x[c]).all():
                rows.append(x[c])
                parity.append(c % 2)
    if not rows:
        raise ValueError("No chunk counts: record more decode steps (>= 2 chunks of 16) with more than K pages")
    X = torch.stack(rows)
    parity = torch.tensor(parity)
    sets = chunk_unstable_sets(X, M)
    mean_instab = X.nanmean(0)

    def consensus(mask: torch.Tensor) -> list[int]:
        if not mask.any():
            return []
        freq = sets[mask].float().mean(0)
        return _rank(freq, X[mask].nanmean(0))[:M]

    def recall(cons: list[int], mask: torch.Tensor) -> list[float]:
        if not cons:
            return []
        sel = torch.zeros(heads, dtype=torch.bool)
        sel[cons] = True
        return ((sets[mask] & sel).sum(-1).float() / M).tolist()

    even, odd = parity == 0, parity == 1
    c_even, c_odd = consensus(even), consensus(odd)
    r_odd, r_even = recall(c_even, odd), recall(c_odd, even)
    everything = torch.ones_like(even)
    c_all = consensus(everything)
    r_all = recall(c_all, everything)
    nan = float("nan")
    return Classification(
        M=M,
        unstable=sorted(c_all),
        frequency=sets.float().mean(0),
        instability=mean_instab,
        chunks=len(rows),
        heldout_recall=sum(r_odd) / len(r_odd) if r_odd else nan,
        heldout_recall_min=min(r_odd) if r_odd else nan,
        heldout_recall_swapped=sum(r_even) / len(r_even) if r_even else nan,
        heldout_consensus_overlap=len(set(c_even) & set(c_odd)) / M if c_even and c_odd else nan,
        insample_recall=sum(r_all) / len(r_all),
        chance_recall=M / heads,
    )


# ================================================================================================
# text from CPython
# ================================================================================================
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


# ================================================================================================
# recording
# ================================================================================================
@dataclass
class StabilityRecords:
    """Top-K page sets of every decode step of every sample.

    topk[method]: list (per sample) of int32 [steps, layers, kv_heads, K], page indices, -1 padded when
    fewer than K candidates; num_pages: list of int32 [steps], candidate pages N(t) (the pages before
    the newest token's page); captured_mass[method]: list of float32 [steps, layers, kv_heads], the share
    of the group's attention (mean over its query heads) that falls in that method's top-K pages.
    """

    num_layers: int
    num_kv_heads: int
    page_size: int
    topk_pages: int
    group_reduce: str
    topk: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {m: [] for m in METHODS})
    num_pages: list[torch.Tensor] = field(default_factory=list)
    captured_mass: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {m: [] for m in METHODS})
    samples: list[dict] = field(default_factory=list)  # description of each sample's text
    meta: dict[str, Any] = field(default_factory=dict)

    def instability(self, method: str = "attention", window: int = WINDOW) -> list[torch.Tensor]:
        """Per sample, 1 - TS of every chunk: float32 [chunks, layers, kv_heads]."""
        return [
            1 - temporal_stability(S.long(), N, self.topk_pages, window)
            for S, N in zip(self.topk[method], self.num_pages)
        ]

    def save(self, path) -> None:
        torch.save({k: getattr(self, k) for k in self.__dataclass_fields__}, path)

    @classmethod
    def load(cls, path) -> "StabilityRecords":
        return cls(**torch.load(path, weights_only=True))


class _Recorder:
    """State shared with the registered attention function during one sample's decode."""

    def __init__(self, num_layers, num_kv_heads, steps, page_size, topk_pages, group_reduce):
        self.L, self.H, self.steps = num_layers, num_kv_heads, steps
        self.ps, self.K, self.group_reduce = page_size, topk_pages, group_reduce
        self.step: int | None = None  # None during prefill: nothing is recorded
        self.topk = {m: torch.full((steps, num_layers, num_kv_heads, topk_pages), -1, dtype=torch.int32) for m in METHODS}
        self.mass = {m: torch.zeros(steps, num_layers, num_kv_heads) for m in METHODS}
        self.num_pages = torch.zeros(steps, dtype=torch.int32)
        self.observed = 0
        self.minmax: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> kmin, kmax of full pages

    def observe(self, layer: int, q: torch.Tensor, key: torch.Tensor, probs: torch.Tensor) -> None:
        """q [Hkv, G, D] fp32; key [Hkv, T, D] (newest token last); probs [Hkv, G, T] fp32."""
        t = self.step
        self.observed += 1
        T = key.shape[1]
        P = (T - 1) // self.ps  # candidates: full pages before the newest token's page
        self.num_pages[t] = P
        if P == 0:
            return
        k = min(self.K, P)
        page_mass = probs[..., : P * self.ps].reshape(probs.shape[0], probs.shape[1], P, self.ps).sum(-1)  # [H,G,P]
        attn_score = page_mass.sum(1) if self.group_reduce == "sum" else page_mass.amax(1)
        # MinMax metadata of full pages never changes (cached keys are post-RoPE): extend it incrementally
        kmin, kmax = self.minmax.get(layer, (key.new_empty(key.shape[0], 0, key.shape[2]),) * 2)
        done = kmin.shape[1]
        if P > done:
            new = key[None, :, done * self.ps : P * self.ps]
            nmin, nmax = page_minmax_ref(new, torch.ones(1, new.shape[2], dtype=torch.bool, device=key.device), self.ps)
            kmin, kmax = torch.cat([kmin, nmin[0]], 1), torch.cat([kmax, nmax[0]], 1)
            self.minmax[layer] = (kmin, kmax)
        mm_score = page_scores_ref(q, kmin[:, :P], kmax[:, :P])  # [H, P]
        group_mass = page_mass.mean(1)  # [H, P] share of the group's attention per page
        for method, score in (("attention", attn_score), ("minmax", mm_score)):
            idx = score.topk(k, dim=-1).indices
            self.topk[method][t, layer, :, :k] = idx.to(torch.int32).cpu()
            self.mass[method][t, layer] = group_mass.gather(-1, idx).sum(-1).cpu()


_ACTIVE: _Recorder | None = None


def _profile_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Plain attention; at decode steps of an active recorder it is computed explicitly and recorded."""
    rec = _ACTIVE
    if rec is None or rec.step is None or query.shape[2] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError("The profiling recorder runs one sequence at a time (batch 1)")
    _, Hq, _, D = query.shape
    Hkv, T = key.shape[1], key.shape[2]
    G = Hq // Hkv
    scale = scaling if scaling is not None else D**-0.5
    q = query[0, :, 0].float().reshape(Hkv, G, D)
    k, v = key[0].float(), value[0].float()
    logits = torch.einsum("hgd,htd->hgt", q, k) * scale
    if attention_mask is not None:
        m = attention_mask[0, :, -1, :T]  # [1 or Hq, T]
        m = m.reshape(-1, 1, T) if m.shape[0] == 1 else m.reshape(Hkv, G, T)
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("hgt,htd->hgd", probs, v).reshape(1, 1, Hq, D).to(query.dtype)
    rec.observe(module.layer_idx, q, k, probs)
    return out, None


def register_attention() -> str:
    """Register "flexicache_profile" in transformers' AttentionInterface and AttentionMaskInterface."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _profile_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME


@contextlib.contextmanager
def _attn_implementation(model, name: str):
    old = model.config._attn_implementation
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ValueError(f"{type(model).__name__} cannot switch its attention implementation to {name!r}: "
                         "it does not use transformers' AttentionInterface, so it cannot be profiled")
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def _num_heads(config) -> tuple[int, int]:
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


@torch.inference_mode()
def record_stability(
    model,
    tokenizer,
    *,
    samples: int = 4,
    prompt_tokens: int = 2048,
    decode_steps: int = 128,
    page_size: int = 16,
    topk_pages: int = 16,
    seed: int = 0,
    data: str = "mixed",
    mode: str = "teacher",
    group_reduce: str = "sum",
    windows: Sequence[TextWindow] | None = None,
    progress: bool = True,
) -> StabilityRecords:
    """Run the model on `samples` long prompts and record each decode step's top-K pages (see module doc).

    mode "teacher": the decode steps feed the text's next `decode_steps` tokens (teacher forcing);
    "greedy": they feed the model's own argmax tokens. windows: use these token windows instead of
    CPython text (each must hold prompt_tokens + decode_steps tokens in teacher mode).
    """
    if mode not in ("teacher", "greedy"):
        raise ValueError(f"mode must be 'teacher' or 'greedy', got {mode!r}")
    if group_reduce not in ("sum", "max"):
        raise ValueError(f"group_reduce must be 'sum' or 'max', got {group_reduce!r}")
    from transformers import DynamicCache

    global _ACTIVE
    L, H = _num_heads(model.config)
    text_cfg = model.config.get_text_config(decoder=True)
    if any(t != "full_attention" for t in (getattr(text_cfg, "layer_types", None) or [])):
        raise ValueError("The model has sliding-window (or other non-full) attention layers; their cache keeps "
                         "only a window, so page sets are not comparable over steps: profiling needs full attention")
    if windows is None:
        windows = cpython_text_windows(tokenizer, samples, prompt_tokens + decode_steps, seed=seed, data=data)
    need = prompt_tokens + (decode_steps if mode == "teacher" else 0)
    if any(w.input_ids.numel() < need for w in windows):
        raise ValueError(f"Every window needs {need} tokens (prompt_tokens + decode_steps in teacher mode)")
    records = StabilityRecords(L, H, page_size, topk_pages, group_reduce)
    records.meta = {"mode": mode, "prompt_tokens": prompt_tokens, "decode_steps": decode_steps, "seed": seed, "data": data}
    device = next(model.parameters()).device
    register_attention()
    bar = _progress(total=len(windows) * decode_steps, enabled=progress)
    with _attn_implementation(model, ATTN_NAME):
        for i, w in enumerate(windows):
            ids = w.input_ids.to(device)
            rec = _Recorder(L, H, decode_steps, page_size, topk_pages, group_reduce)
            _ACTIVE = rec
            try:
                cache = DynamicCache(config=model.config)
                bar.set_description(f"sample {i + 1}/{len(windows)} prefill")
                out = model(input_ids=ids[None, :prompt_tokens], past_key_values=cache, use_cache=True, logits_to_keep=1)
                bar.set_description(f"sample {i + 1}/{len(windows)} decode")
                generated = []
                for t in range(decode_steps):
                    nxt = ids[prompt_tokens + t] if mode == "teacher" else out.logits[0, -1].argmax()
                    generated.append(int(nxt))
                    rec.step = t
                    out = model(input_ids=nxt.reshape(1, 1), past_key_values=cache, use_cache=True, logits_to_keep=1)
                    rec.step = None
                    bar.update(1)
            finally:
                _ACTIVE = None
            if rec.observed == 0:
                raise RuntimeError("The profiling attention function was never called at a decode step: the model "
                                   "does not route attention through transformers' AttentionInterface")
            for m in METHODS:
                records.topk[m].append(rec.topk[m])
                records.captured_mass[m].append(rec.mass[m])
            records.num_pages.append(rec.num_pages)
            desc = {"text": w.name, "kind": w.kind, "char_offset": w.char_offset}
            if mode == "greedy":
                desc["greedy_text_head"] = tokenizer.decode(generated[:32])
            records.samples.append(desc)
    bar.close()
    return records


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, disable=not enabled, unit="step", dynamic_ncols=True)
    except ImportError:  # tqdm is optional: a silent stand-in

        class _Silent:
            def update(self, n=1): ...
            def set_description(self, s): ...
            def close(self): ...

        return _Silent()


# ================================================================================================
# profile
# ================================================================================================
def config_fingerprint(config) -> dict:
    """What a model's config says about its shape; `profiles_registry` falls back to matching it."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    L, H = _num_heads(config)
    return {
        "model_type": getattr(cfg, "model_type", None),
        "num_hidden_layers": L,
        "num_key_value_heads": H,
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
    }


def _grid(x: torch.Tensor, L: int, H: int, digits: int = 4) -> list[list[float]]:
    return [[round(float(v), digits) for v in row] for row in x.reshape(L, H)]


def profile_from_records(
    records: StabilityRecords,
    *,
    unstable: int | float = 0.25,
    method: str = "attention",
    model_id: str | None = None,
    fingerprint: dict | None = None,
    extra_metadata: dict | None = None,
) -> HeadProfile:
    """Classify the recorded heads (`classify_heads`) and build the HeadProfile with its evidence."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    L, H = records.num_layers, records.num_kv_heads
    results = {m: classify_heads(records.instability(m), unstable) for m in METHODS}
    main = results[method]
    pairs = [(i // H, i % H) for i in main.unstable]

    def summary(c: Classification) -> dict:
        return {
            "unstable": [[i // H, i % H] for i in c.unstable],
            "heldout_recall": round(c.heldout_recall, 4),
            "heldout_recall_min": round(c.heldout_recall_min, 4),
            "heldout_recall_swapped": round(c.heldout_recall_swapped, 4),
            "heldout_consensus_overlap": round(c.heldout_consensus_overlap, 4),
            "insample_recall": round(c.insample_recall, 4),
            "mean_instability": round(float(c.instability.nanmean()), 4),
        }

    methods = {m: summary(c) for m, c in results.items()}
    for m in METHODS:
        methods[m]["captured_attention_mass"] = round(float(torch.cat(records.captured_mass[m]).mean()), 4)
        methods[m]["instability"] = _grid(results[m].instability, L, H)
    a, b = set(results["attention"].unstable), set(results["minmax"].unstable)
    meta = {
        "model_id": model_id,
        "source": "measured with flexicache_hf.profiling (REFERENCE.md section 3)",
        "tool": "flexicache_hf.profiling",
        "tool_version": _tool_version(),
        "page_size": records.page_size,
        "topk_pages": records.topk_pages,
        "window": WINDOW,
        "unstable_count": main.M,
        "unstable_fraction": round(main.M / (L * H), 4),
        "score_method": method,
        "attention_group_reduce": records.group_reduce,
        "data": {
            **records.meta,
            "corpus": "CPython standard library text: docstrings (prose), source (code), LICENSE.txt",
            "python": platform.python_version(),
            "samples": records.samples,
        },
        "chunks": main.chunks,
        "recall": {
            "heldout_recall": round(main.heldout_recall, 4),
            "heldout_recall_min": round(main.heldout_recall_min, 4),
            "heldout_recall_swapped": round(main.heldout_recall_swapped, 4),
            "heldout_consensus_overlap": round(main.heldout_consensus_overlap, 4),
            "insample_recall": round(main.insample_recall, 4),
            "chance": round(main.chance_recall, 4),
            "definition": "heldout_recall: consensus of the even chunks vs each odd chunk's unstable set, "
                          "mean over odd chunks of |C_even ∩ U_c| / M (see profiling.classify_heads)",
        },
        "instability": _grid(main.instability, L, H),
        "selection_frequency": _grid(main.frequency, L, H),
        "methods": methods,
        "method_overlap": round(len(a & b) / main.M, 4),
    }
    if fingerprint:
        meta["config_fingerprint"] = fingerprint
    meta.update(extra_metadata or {})
    return HeadProfile(L, H, pairs, meta)


def profile_model(
    model,
    tokenizer,
    *,
    samples: int = 4,
    prompt_tokens: int = 2048,
    decode_steps: int = 128,
    page_size: int = 16,
    topk_pages: int = 16,
    unstable: int | float = 0.25,
    seed: int = 0,
    data: str = "mixed",
    mode: str = "teacher",
    method: str = "attention",
    group_reduce: str = "sum",
    model_id: str | None = None,
    progress: bool = True,
    records_out: list | None = None,
) -> HeadProfile:
    """Record (`record_stability`) and classify (`profile_from_records`): the model's HeadProfile.

    method: which top-K sets define stability for the profile ("attention" mass, the ground truth of
    which pages matter, or "minmax", what the cache ranks with); both are always measured and stored
    in metadata["methods"], with the overlap of their unstable sets in metadata["method_overlap"].
    records_out: a list to append the StabilityRecords to (for plot_rco_curves).
    """
    t0 = time.perf_counter()
    records = record_stability(
        model, tokenizer, samples=samples, prompt_tokens=prompt_tokens, decode_steps=decode_steps,
        page_size=page_size, topk_pages=topk_pages, seed=seed, data=data, mode=mode,
        group_reduce=group_reduce, progress=progress,
    )
    if records_out is not None:
        records_out.append(records)
    if model_id is None:
        model_id = _model_id(model)
    import transformers

    device = next(model.parameters()).device
    extra = {
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "environment": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(),
        },
    }
    return profile_from_records(
        records, unstable=unstable, method=method, model_id=model_id,
        fingerprint=config_fingerprint(model.config), extra_metadata=extra,
    )


def _model_id(model) -> str:
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    return name.rstrip("/").split("/")[-1] if os.path.isdir(name) else name


# ================================================================================================
# pictures
# ================================================================================================
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_stability_heatmap(profile: HeadProfile, path, title: str | None = None) -> None:
    """Instability (mean 1 - TS) per layer x KV head, unstable heads of the profile marked with a dot.

    A profile without metadata["instability"] (e.g. the paper's) is drawn as its unstable mask.
    """
    plt = _plt()
    L, H = profile.num_layers, profile.num_kv_heads
    inst = profile.metadata.get("instability")
    if inst is not None:
        grid = torch.tensor(inst, dtype=torch.float32)
        label = "instability (1 - TS)"
    else:
        grid = torch.zeros(L, H)
        for l, h in profile.unstable:
            grid[l, h] = 1
        label = "unstable (profile)"
    fig_w = min(16, max(6, 0.32 * L + 2))
    fig, ax = plt.subplots(figsize=(fig_w, max(2.2, 0.45 * H + 1.4)))
    im = ax.imshow(grid.T.numpy(), aspect="auto", cmap="viridis", origin="lower", interpolation="nearest")
    if profile.unstable:
        ls, hs = zip(*profile.unstable)
        ax.scatter(ls, hs, s=14, c="red", marker="o")
    ax.set_xlabel(f"layer    (red dots: the profile's {len(profile.unstable)} unstable heads of {L * H})")
    ax.set_ylabel("KV head")
    ax.set_yticks(range(H))
    step = max(1, L // 16)
    ax.set_xticks(range(0, L, step))
    fig.colorbar(im, ax=ax, label=label, pad=0.01)
    m = profile.metadata
    ax.set_title(title or f"{m.get('model_id') or 'model'}: head instability (K={m.get('topk_pages')} pages of {m.get('page_size')})")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_rco_curves(
    records: StabilityRecords,
    heads: Iterable[tuple[int, int]],
    path,
    method: str = "attention",
    max_offset: int | None = None,
    title: str | None = None,
    profile: HeadProfile | None = None,
) -> None:
    """RCO(s, s+d) averaged over reference steps s and samples, vs the step offset d, for a few heads.

    The kind of the paper's Figure 1: stable heads keep a high overlap with their set of d steps ago,
    unstable heads lose it within a few steps. The dashed line marks the last offset inside a chunk
    (W - 1 = 15). With `profile`, each label says whether the profile counts the head as unstable.
    """
    plt = _plt()
    steps = min(S.shape[0] for S in records.topk[method])
    max_offset = max_offset or min(64, steps - 1)
    curves = []
    for S, N in zip(records.topk[method], records.num_pages):
        curves.append(rco_by_offset(S.long(), N, records.topk_pages, max_offset))
    curve = torch.stack(curves).nanmean(0)  # [max_offset, L, H]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    d = list(range(1, max_offset + 1))
    unstable = set(profile.unstable) if profile is not None else set()
    for l, h in heads:
        tag = "" if profile is None else (" (unstable)" if (l, h) in unstable else " (stable)")
        ax.plot(d, curve[:, l, h].numpy(), label=f"layer {l}, KV head {h}{tag}")
    ax.axvline(WINDOW - 1, color="grey", ls="--", lw=0.8)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step offset d = t - s")
    ax.set_ylabel("RCO(s, s+d), mean over s")
    ax.set_title(title or f"Random-corrected overlap of top-{records.topk_pages} pages ({method})")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def pick_curve_heads(profile: HeadProfile, n: int = 2) -> list[tuple[int, int]]:
    """The n most stable, the median and the n most unstable heads by metadata["instability"]."""
    inst = torch.tensor(profile.metadata["instability"]).flatten()
    order = torch.argsort(inst).tolist()
    H = profile.num_kv_heads
    picked = order[:n] + [order[len(order) // 2]] + order[-n:]
    return [(i // H, i % H) for i in dict.fromkeys(picked)]
