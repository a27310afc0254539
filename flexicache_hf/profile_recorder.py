"""The profiling recorder: run a causal LM and write down, at every decode step, each KV head's top-K pages.

`record_stability` runs a Hugging Face model on token windows with a registered attention function
("flexicache_profile") over a plain DynamicCache. Prefill is SDPA. At a decode step (one query token) the
function computes attention explicitly and hands the query, keys and probabilities to the `PageRecorder`
that the forward call carries (`model(..., profile_recorder=rec)`: transformers passes a forward's extra
keywords on to the attention function), which keeps, per (layer, KV head), the top-K page set S(t) by two
scores over the candidate pages (every full page before the newest token's page: the cache always attends
the current page, so it is no candidate):

- "attention": the exact attention mass of the page (softmax probabilities summed over its tokens), SUMMED
  over the query heads of the KV head's GQA group (what the whole group loses when the page is left out);
  `group_reduce="max"` takes the max instead;
- "minmax": the MinMax upper bound the cache ranks with (docs/method.md, "Page selection"), computed by
  `ops.page_scores_ref` over `ops.page_minmax_ref` of the cached (post-RoPE) keys: a max over the group.

A forward without a recorder (prefill, or any other caller of the registered name) is plain SDPA: no
module state decides what is recorded.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from flexicache_hf.compat import cache_kwargs
from flexicache_hf.ops import page_minmax_ref, page_scores_ref
from flexicache_hf.profile_text import TextWindow, cpython_text_windows
from flexicache_hf.stability import WINDOW, temporal_stability

ATTN_NAME = "flexicache_profile"
RECORDER_KWARG = "profile_recorder"  # the forward keyword that carries a PageRecorder to the attention function
METHODS = ("attention", "minmax")


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

    def add(self, rec: "PageRecorder", description: dict) -> None:
        """Append one sample's recording."""
        for m in METHODS:
            self.topk[m].append(rec.topk[m])
            self.captured_mass[m].append(rec.mass[m])
        self.num_pages.append(rec.num_pages)
        self.samples.append(description)

    def save(self, path) -> None:
        torch.save({k: getattr(self, k) for k in self.__dataclass_fields__}, path)

    @classmethod
    def load(cls, path) -> "StabilityRecords":
        return cls(**torch.load(path, weights_only=True))


class PageRecorder:
    """One sample's top-K page sets, filled by the attention function at the decode steps it is passed to.

    `step` is the decode step being recorded (set by the caller before each forward); a forward that
    carries the recorder with `step` None records nothing.
    """

    def __init__(self, num_layers, num_kv_heads, steps, page_size, topk_pages, group_reduce="sum"):
        self.L, self.H, self.steps = num_layers, num_kv_heads, steps
        self.ps, self.K, self.group_reduce = page_size, topk_pages, group_reduce
        self.step: int | None = None
        self.topk = {m: torch.full((steps, num_layers, num_kv_heads, topk_pages), -1, dtype=torch.int32) for m in METHODS}
        self.mass = {m: torch.zeros(steps, num_layers, num_kv_heads) for m in METHODS}
        self.num_pages = torch.zeros(steps, dtype=torch.int32)
        self.observed = 0
        self.minmax: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> kmin, kmax of full pages

    def observe(self, layer: int, q: torch.Tensor, key: torch.Tensor, probs: torch.Tensor) -> None:
        """q [Hkv, G, D] fp32; key [Hkv, T, D] (newest token last); probs [Hkv, G, T] fp32."""
        t = self.step
        self.observed += 1
        P = (key.shape[1] - 1) // self.ps  # candidates: full pages before the newest token's page
        self.num_pages[t] = P
        if P == 0:
            return
        k = min(self.K, P)
        page_mass = probs[..., : P * self.ps].reshape(probs.shape[0], probs.shape[1], P, self.ps).sum(-1)  # [H,G,P]
        attn_score = page_mass.sum(1) if self.group_reduce == "sum" else page_mass.amax(1)
        kmin, kmax = self._page_minmax(layer, key, P)
        mm_score = page_scores_ref(q, kmin[:, :P], kmax[:, :P])  # [H, P]
        group_mass = page_mass.mean(1)  # [H, P] share of the group's attention per page
        for method, score in (("attention", attn_score), ("minmax", mm_score)):
            idx = score.topk(k, dim=-1).indices
            self.topk[method][t, layer, :, :k] = idx.to(torch.int32).cpu()
            self.mass[method][t, layer] = group_mass.gather(-1, idx).sum(-1).cpu()

    def _page_minmax(self, layer: int, key: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor]:
        """kmin, kmax [Hkv, >= P, D] of the layer's full pages, extended incrementally: a full page's cached
        (post-RoPE) keys never change."""
        kmin, kmax = self.minmax.get(layer, (key.new_empty(key.shape[0], 0, key.shape[2]),) * 2)
        done = kmin.shape[1]
        if P > done:
            new = key[None, :, done * self.ps : P * self.ps]
            nmin, nmax = page_minmax_ref(new, torch.ones(1, new.shape[2], dtype=torch.bool, device=key.device), self.ps)
            kmin, kmax = torch.cat([kmin, nmin[0]], 1), torch.cat([kmax, nmax[0]], 1)
            self.minmax[layer] = (kmin, kmax)
        return kmin, kmax


def profile_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Plain attention; at a decode step of the PageRecorder the forward carries, computed explicitly and recorded."""
    rec: PageRecorder | None = kwargs.pop(RECORDER_KWARG, None)
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

    AttentionInterface.register(ATTN_NAME, profile_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME


@contextlib.contextmanager
def attn_implementation(model, name: str):
    """Switch the model's attention implementation to `name` for the block, and back."""
    old = model.config._attn_implementation
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ValueError(f"{type(model).__name__} cannot switch its attention implementation to {name!r}: "
                         "it does not use transformers' AttentionInterface, so it cannot be profiled")
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def num_heads(config) -> tuple[int, int]:
    """(layers, KV heads) of a model config (its text config for multimodal ones)."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def _check_full_attention(config) -> None:
    text_cfg = config.get_text_config(decoder=True)
    if any(t != "full_attention" for t in (getattr(text_cfg, "layer_types", None) or [])):
        raise ValueError("The model has sliding-window (or other non-full) attention layers; their cache keeps "
                         "only a window, so page sets are not comparable over steps: profiling needs full attention")


def _record_sample(model, ids: torch.Tensor, rec: PageRecorder, prompt_tokens: int, mode: str, bar, label: str) -> list[int]:
    """Prefill ids[:prompt_tokens], then decode rec.steps steps, recording each; returns the fed decode tokens."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    bar.set_description(f"{label} prefill")
    out = model(input_ids=ids[None, :prompt_tokens], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    bar.set_description(f"{label} decode")
    generated = []
    for t in range(rec.steps):
        nxt = ids[prompt_tokens + t] if mode == "teacher" else out.logits[0, -1].argmax()
        generated.append(int(nxt))
        rec.step = t
        out = model(input_ids=nxt.reshape(1, 1), **cache_kwargs(cache), use_cache=True, logits_to_keep=1,
                    **{RECORDER_KWARG: rec})
        rec.step = None
        bar.update(1)
    if rec.observed == 0:
        raise RuntimeError("The profiling attention function was never called at a decode step: the model "
                           "does not route attention through transformers' AttentionInterface")
    return generated


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
    L, H = num_heads(model.config)
    _check_full_attention(model.config)
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
    with attn_implementation(model, ATTN_NAME):
        for i, w in enumerate(windows):
            rec = PageRecorder(L, H, decode_steps, page_size, topk_pages, group_reduce)
            label = f"sample {i + 1}/{len(windows)}"
            generated = _record_sample(model, w.input_ids.to(device), rec, prompt_tokens, mode, bar, label)
            desc = {"text": w.name, "kind": w.kind, "char_offset": w.char_offset}
            if mode == "greedy":
                desc["greedy_text_head"] = tokenizer.decode(generated[:32])
            records.add(rec, desc)
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
