"""Head stability, the arithmetic: RCO, temporal stability (TS) and the consensus of unstable heads.

Shared by the offline profiling tool (`flexicache_hf.profiling`) and the online calibration of
profile="auto" (`flexicache_hf.calibration`), so that both classify heads by the same measures. Plain
tensor math over recorded top-K page sets: no model, no text, no plotting, no transformers. Definitions:
docs/method.md, "Profiling".

- RCO(s,t) = max(0, (|S(s) ∩ S(t)|/K - K/N(t)) / (1 - K/N(t))): overlap of two top-K page sets, corrected
  for what a random choice of K of the N(t) candidate pages would share (0: chance, 1: the same set).
- TS(s) = mean of RCO(s,t) over t = s+1 .. s+W-1, for chunks of W = 16 steps starting at 0, 16, 32, ...;
  instability = 1 - TS. Only steps with N(t) > K count (with N <= K, the top-K is every page), and a chunk
  whose reference step s does not count is skipped.
- Per chunk, the M least stable heads form its unstable set; the heads most often in those sets (ties:
  higher mean instability) are the consensus. Held-out recall@M checks it on chunks it was not built from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

WINDOW = 16


# ------------------------------------------------------------------------------------------------
# RCO and TS
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# classification
# ------------------------------------------------------------------------------------------------
def resolve_count(unstable: int | float, total_heads: int) -> int:
    """M from an int count (1..total) or a fraction in (0, 1] of all KV heads (rounded half up, at least 1).

    A float that is a whole number > 1 (e.g. 64.0) is a count; 1.0 is the fraction "every head".
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


def _counting_chunks(instability: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every chunk with a value, over all samples: instability [C, heads] and its index parity [C] (0 even)."""
    per_sample = list(instability) if not isinstance(instability, torch.Tensor) or instability.dim() == 3 else [instability]
    rows, parity = [], []
    for x in per_sample:
        x = x.reshape(x.shape[0], -1).float()
        for c in range(x.shape[0]):
            if not torch.isnan(x[c]).all():
                rows.append(x[c])
                parity.append(c % 2)
    if not rows:
        raise ValueError("No chunk counts: record more decode steps (>= 2 chunks of 16) with more than K pages")
    return torch.stack(rows), torch.tensor(parity)


def _consensus(sets: torch.Tensor, X: torch.Tensor, mask: torch.Tensor, M: int) -> list[int]:
    """The M heads most often in the unstable sets of the chunks in `mask` (ties: higher mean instability)."""
    if not mask.any():
        return []
    return _rank(sets[mask].float().mean(0), X[mask].nanmean(0))[:M]


def _recall(sets: torch.Tensor, cons: list[int], mask: torch.Tensor, M: int) -> list[float]:
    """|cons ∩ U_c| / M for every chunk c in `mask`."""
    if not cons:
        return []
    sel = torch.zeros(sets.shape[1], dtype=torch.bool)
    sel[cons] = True
    return ((sets[mask] & sel).sum(-1).float() / M).tolist()


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
    X, parity = _counting_chunks(instability)
    heads = X.shape[1]
    M = resolve_count(unstable, heads)
    sets = chunk_unstable_sets(X, M)
    even, odd, everything = parity == 0, parity == 1, torch.ones_like(parity, dtype=torch.bool)
    c_even, c_odd, c_all = (_consensus(sets, X, m, M) for m in (even, odd, everything))
    r_odd, r_even, r_all = _recall(sets, c_even, odd, M), _recall(sets, c_odd, even, M), _recall(sets, c_all, everything, M)
    nan = float("nan")
    return Classification(
        M=M,
        unstable=sorted(c_all),
        frequency=sets.float().mean(0),
        instability=X.nanmean(0),
        chunks=X.shape[0],
        heldout_recall=sum(r_odd) / len(r_odd) if r_odd else nan,
        heldout_recall_min=min(r_odd) if r_odd else nan,
        heldout_recall_swapped=sum(r_even) / len(r_even) if r_even else nan,
        heldout_consensus_overlap=len(set(c_even) & set(c_odd)) / M if c_even and c_odd else nan,
        insample_recall=sum(r_all) / len(r_all),
        chance_recall=M / heads,
    )
