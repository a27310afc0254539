"""One runner for every method: shared dense prefill, per-method cache, greedy decode, scoring, resumable JSON.

For each sample the prompt is run once through the model with a `DynamicCache` (dense, exactly what every
method does at prefill: FlexiCache's prefill is dense attention, and the eviction peers evict after it),
capturing the last prompt queries for SnapKV. Each (method, budget) then gets its own cache seeded from
that prefill and decodes greedily (`model(...)` one token at a time, explicit positions) until EOS or the
task's token limit (or once the answer is followed by an empty line). So every method answers the same prompt from the same first token, and a sample's
prefill is paid once instead of once per (method, budget). `shared_prefill=False` runs every (method,
budget) through its own full prefill instead (slower; for checking).

Results go to `<out>/results.json` after every record (atomic replace); a run skips every
(model, task, length, sample, method, budget) already there with the same prompt hash (resume).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from flexicache_hf.compat import cache_kwargs
from flexicache_hf.eval import methods as M
from flexicache_hf.eval.peers import capture_query_windows
from flexicache_hf.eval.report import load

RESULTS = "results.json"


# ---------------------------------------------------------------------------------------------------
# results file
# ---------------------------------------------------------------------------------------------------
def budget_key(budget) -> str:
    return "full" if budget is None else str(int(budget))


def record_key(rec: dict) -> tuple:
    return (rec["model"], rec["task"], int(rec["length"]), int(rec["sample"]), rec["method"], budget_key(rec["budget"]))


class ResultStore:
    """results.json: {"runs": [run metadata ...], "records": [...], "fidelity": [...]}, rewritten atomically."""

    def __init__(self, out_dir, resume: bool = True):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / RESULTS
        self.data = {"runs": [], "records": [], "fidelity": []}
        if resume and self.path.exists():
            self.data = load(self.dir)  # a ValueError naming the file if it is corrupted
            for key in ("runs", "records", "fidelity"):
                self.data.setdefault(key, [])
        self._index = {record_key(r): r for r in self.data["records"]}
        self._findex = {record_key(r): r for r in self.data["fidelity"]}

    def has(self, key: tuple, prompt_sha: str | None = None, fidelity: bool = False) -> bool:
        rec = (self._findex if fidelity else self._index).get(key)
        return rec is not None and (prompt_sha is None or rec.get("prompt_sha") == prompt_sha)

    def add(self, rec: dict, fidelity: bool = False) -> None:
        key = record_key(rec)
        index, table = (self._findex, self.data["fidelity"]) if fidelity else (self._index, self.data["records"])
        if key in index:
            table.remove(index[key])
        table.append(rec)
        index[key] = rec
        self.save()

    def add_run(self, meta: dict) -> None:
        self.data["runs"].append(meta)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


# ---------------------------------------------------------------------------------------------------
# model helpers
# ---------------------------------------------------------------------------------------------------
def model_name(model) -> str:
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    return name.rstrip("/").split("/")[-1]


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if src is None:
            continue
        ids.update(src if isinstance(src, (list, tuple)) else [src])
    return ids


def resolve_profile(model, tokenizer, profile=None, out_dir=None, log=print):
    """The model's HeadProfile: `profile` (HeadProfile or JSON path) if given; else the shipped one; else a
    temporary one measured here with flexicache_hf.profiling (small settings, saved under out_dir)."""
    from flexicache_hf.profiles import HeadProfile

    if isinstance(profile, HeadProfile):
        return profile
    if profile:
        return HeadProfile.load(profile)
    with contextlib.suppress(Exception):
        from flexicache_hf.profiles_registry import find_profile

        found = find_profile(model.config)
        if found is not None:
            found.metadata.setdefault("source", "shipped")
            return found
    path = Path(out_dir) / f"temporary_profile_{model_name(model)}.json" if out_dir else None
    if path is not None and path.exists():
        log(f"[eval] no shipped profile for {model_name(model)}: using the temporary profile {path}")
        return HeadProfile.load(path)
    log(f"[eval] no shipped profile for {model_name(model)}: measuring a TEMPORARY one (flexicache_hf.profiling, "
        "2 samples x 1024-token prompts x 64 decode steps, 25% unstable)")
    from flexicache_hf import profiling

    prof = profiling.profile_model(
        model, tokenizer, samples=2, prompt_tokens=1024, decode_steps=64,
        topk_pages=16, unstable=0.25, seed=0, progress=False,
    )
    prof.metadata["source"] = "TEMPORARY profile measured by the eval harness (no shipped profile existed)"
    if path is not None:
        prof.save(path)
    return prof


@torch.no_grad()
def run_prefill(model, input_ids: torch.Tensor, query_window: int = 32) -> M.Prefill:
    """Dense prefill with a DynamicCache; captures the last `query_window` queries of every layer."""
    t0 = time.perf_counter()
    cache = DynamicCache(config=model.config)
    with capture_query_windows(model, query_window) as cap:
        out = model(input_ids=input_ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    n_layers = len(cache.layers)
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    if input_ids.device.type == "cuda":
        torch.cuda.synchronize()
    return M.Prefill(input_ids, kv, cap.ordered(n_layers), out.logits[:, -1].float(), time.perf_counter() - t0)


@torch.no_grad()
def greedy_decode(model, cache, first_logits, prompt_len: int, max_new_tokens: int, eos: set[int], stop=None) -> list[int]:
    """Greedy tokens from `first_logits` on, one model(...) call per token, explicit positions."""
    device = first_logits.device
    tokens: list[int] = []
    nxt = int(first_logits[0].argmax())
    for step in range(max_new_tokens):
        tokens.append(nxt)
        if nxt in eos or (stop is not None and stop(tokens)) or step == max_new_tokens - 1:
            break
        out = model(
            input_ids=torch.tensor([[nxt]], device=device), **cache_kwargs(cache), use_cache=True,
            position_ids=torch.tensor([[prompt_len + step]], device=device),
        )
        nxt = int(out.logits[0, -1].argmax())
    return tokens


def blank_line_stopper(tokenizer):
    """Stop once the answer has content followed by an empty line (the model moved on to something else)."""

    def stop(tokens: list[int]) -> bool:
        body = tokenizer.decode(tokens, skip_special_tokens=True).lstrip(" \t\n:.*-")
        return "\n\n" in body

    return stop


def method_cache(method, ctx, budget, prefill, model, shared_prefill: bool = True):
    """(cache holding the prompt, logits after the prompt): seeded from the shared prefill, or a real prefill."""
    if shared_prefill:
        with contextlib.suppress(NotImplementedError):
            return method.make_cache(ctx, budget, prefill), prefill.last_logits
    cache = method.empty_cache(ctx, budget, prefill.length)
    with torch.no_grad():
        out = model(input_ids=prefill.input_ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1].float()


# ---------------------------------------------------------------------------------------------------
# task evaluation
# ---------------------------------------------------------------------------------------------------
def load_metrics():
    """The repo's evaluate modules, by local path (no hub)."""
    import evaluate

    root = Path(__file__).resolve().parent / "metrics"
    return {name: evaluate.load(str(root / name)) for name in ("string_match_recall", "contains_match")}


def score(metrics: dict, metric: str, prediction: str, answers: list[str]) -> float:
    return float(metrics[metric].compute(predictions=[prediction], references=[answers])[metric])


def environment(model) -> dict:
    import transformers

    p = next(model.parameters())
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "transformers": transformers.__version__, "device": str(p.device), "dtype": str(p.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(p.device) if p.device.type == "cuda" else None,
    }


def run_tasks(model, tokenizer, dataset, methods, budgets, store: ResultStore, profile, *, method_budgets=None, page_size: int = 16,
              shared_prefill: bool = True, stop_blank_line: bool = True, progress: bool = True, log=print) -> dict:
    """Evaluate every (sample, method, budget) not yet in the store. Returns timing stats.

    Decoding stops at EOS, at the task's token limit, or (stop_blank_line) once the answer is followed by an
    empty line: the same rule for every method, dense included."""
    from tqdm.auto import tqdm

    metrics = load_metrics()
    name = model_name(model)
    eos = eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    max_new = max(dataset["max_new_tokens"]) if len(dataset) else 64
    ctx = M.Context(model, profile, page_size=page_size, max_new_tokens=max_new)
    method_budgets = method_budgets or {}
    configs = [(m, None) for m in methods if not m.uses_budget] + [
        (m, b) for m in methods if m.uses_budget for b in method_budgets.get(m.name, budgets)
    ]
    stats = {"prefill_s": 0.0, "decode_s": 0.0, "records": 0, "skipped": 0}
    stopper = blank_line_stopper(tokenizer) if stop_blank_line else None
    bar = tqdm(total=len(dataset) * len(configs), desc=f"eval {name}", disable=not progress, dynamic_ncols=True)
    for row in dataset:
        sha = hashlib.sha256(row["prompt"].encode()).hexdigest()[:16]
        todo = [
            (m, b) for m, b in configs
            if not store.has((name, row["task"], row["length"], row["sample"], m.name, budget_key(b)), sha)
        ]
        stats["skipped"] += len(configs) - len(todo)
        bar.update(len(configs) - len(todo))
        if not todo:
            continue
        ids = tokenizer(row["prompt"], return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        prefill = run_prefill(model, ids)
        stats["prefill_s"] += prefill.seconds
        for method, budget in todo:
            bar.set_postfix_str(f"{row['task']}#{row['sample']} {method.name}@{budget_key(budget)}")
            t0 = time.perf_counter()
            cache, first = method_cache(method, ctx, budget, prefill, model, shared_prefill)
            kv_bytes_prompt = M.cache_kv_bytes(cache)
            tokens = greedy_decode(model, cache, first, prefill.length, row["max_new_tokens"], eos, stopper)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            rec = {
                "model": name, "task": row["task"], "length": row["length"], "sample": row["sample"],
                "method": method.name, "budget": budget, "prompt_tokens": prefill.length, "prompt_sha": sha,
                "answers": row["answers"], "prediction": text, "tokens": tokens, "metric": row["metric"],
                "score": score(metrics, row["metric"], text, row["answers"]), "decode_s": round(seconds, 3),
                "new_tokens": len(tokens), "kv_bytes_after_prefill": kv_bytes_prompt,
                "kv_bytes_end": M.cache_kv_bytes(cache),
            }
            if hasattr(cache, "profile"):
                rec["unstable_heads"] = len(cache.profile.unstable)
            store.add(rec)
            stats["decode_s"] += seconds
            stats["records"] += 1
            bar.update(1)
            del cache
        del prefill
    bar.close()
    return stats


# ---------------------------------------------------------------------------------------------------
# long-generation fidelity (teacher forcing)
# ---------------------------------------------------------------------------------------------------
def fidelity_text(tokenizer, kind: str, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """`n_tokens` tokens of real CPython text: kind "docs" (language reference) or "code" (stdlib source)."""
    import random

    from flexicache_hf.eval.text_sources import docs_corpus, stdlib_sources

    if kind == "docs":
        text = docs_corpus(order_seed=seed)
    elif kind == "code":
        files = list(stdlib_sources())
        random.Random(seed).shuffle(files)
        text = "\n\n".join(f"# File: Lib/{rel}\n{src}" for rel, src in files)
    else:
        raise ValueError(f"fidelity text kind must be 'docs' or 'code', got {kind!r}")
    ids = tokenizer(text[: n_tokens * 8], add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        raise RuntimeError(f"CPython's {kind} text has only {len(ids)} tokens, {n_tokens} needed")
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


def adaptive_pages(cache) -> dict:
    """{"pages_per_head": the mean pages a top-p budget read per head and step} for such a cache, else {}."""
    counts = [getattr(layer, "counts", [0, 0]) for layer in getattr(cache, "layers", [])]
    steps = sum(c[1] for c in counts)
    return {"pages_per_head": round(sum(c[0] for c in counts) / steps, 2)} if steps else {}


@torch.no_grad()
def run_fidelity(model, tokenizer, methods, budgets, store: ResultStore, profile, *, prompt_tokens: int,
                 steps: int, kinds=("docs",), seed: int = 0, page_size: int = 16, curve_every: int = 128,
                 progress: bool = True, log=print) -> dict:
    """Teacher-forced decoding through `steps` tokens of real text after a `prompt_tokens` prompt, every
    method in lockstep with dense on the same tokens: top-1 agreement with dense, mean KL(dense || method),
    perplexity of the true next tokens relative to dense."""
    from tqdm.auto import tqdm

    name = model_name(model)
    device = next(model.parameters()).device
    ctx = M.Context(model, profile, page_size=page_size, max_new_tokens=steps)
    dense = M.Dense()
    configs = [(m, b) for m in methods if m.uses_budget for b in budgets]
    stats = {"seconds": 0.0, "steps": 0}
    for si, kind in enumerate(kinds):
        text = fidelity_text(tokenizer, kind, prompt_tokens + steps + 1, seed + si)
        sha = hashlib.sha256(text.numpy().tobytes()).hexdigest()[:16]
        task = f"fidelity_{kind}"
        todo = [(m, b) for m, b in configs if not store.has((name, task, prompt_tokens, si, m.name, budget_key(b)), sha, fidelity=True)]
        if not todo:
            continue
        t0 = time.perf_counter()
        ids = text.to(device)
        prefill = run_prefill(model, ids[None, :prompt_tokens])
        caches = [dense.make_cache(ctx, None, prefill)] + [m.make_cache(ctx, b, prefill) for m, b in todo]
        n = len(caches)
        agree = torch.zeros(n - 1, dtype=torch.float64)
        kl = torch.zeros(n - 1, dtype=torch.float64)
        nll = torch.zeros(n, dtype=torch.float64)
        curves = [[] for _ in range(n - 1)]
        win_agree = torch.zeros(n - 1, dtype=torch.float64)
        bar = tqdm(range(steps), desc=f"fidelity {name} {kind} ({n} caches)", disable=not progress, dynamic_ncols=True)
        for t in bar:
            tok = ids[prompt_tokens + t].view(1, 1)
            target = int(ids[prompt_tokens + t + 1])
            pos = torch.tensor([[prompt_tokens + t]], device=device)
            logps = []
            for cache in caches:
                out = model(input_ids=tok, **cache_kwargs(cache), use_cache=True, position_ids=pos)
                logps.append(torch.log_softmax(out.logits[0, -1].float(), -1))
            ref = logps[0]
            ref_top = int(ref.argmax())
            p_ref = ref.exp()
            nll[0] += -float(ref[target])
            for j, lp in enumerate(logps[1:]):
                hit = float(int(lp.argmax()) == ref_top)
                agree[j] += hit
                win_agree[j] += hit
                kl[j] += float((p_ref * (ref - lp)).sum().clamp(min=0))
                nll[j + 1] += -float(lp[target])
            if (t + 1) % curve_every == 0 or t == steps - 1:
                span = (t % curve_every) + 1
                for j in range(n - 1):
                    curves[j].append(round(float(win_agree[j]) / span, 4))
                win_agree.zero_()
        bar.close()
        elapsed = time.perf_counter() - t0
        stats["seconds"] += elapsed
        stats["steps"] += steps * n
        ppl_dense = math.exp(float(nll[0]) / steps)
        for j, (m, b) in enumerate(todo):
            ppl = math.exp(float(nll[j + 1]) / steps)
            store.add({
                "model": name, "task": task, "length": prompt_tokens, "sample": si, "method": m.name, "budget": b,
                "prompt_sha": sha, "steps": steps, "top1_agreement": float(agree[j]) / steps,
                "mean_kl": float(kl[j]) / steps, "ppl": ppl, "ppl_dense": ppl_dense, "ppl_ratio": ppl / ppl_dense,
                "agreement_curve": curves[j], "curve_every": curve_every, "seconds_all_methods": round(elapsed, 1),
                "kv_bytes_end": M.cache_kv_bytes(caches[j + 1]), **adaptive_pages(caches[j + 1]),
            }, fidelity=True)
        del caches, prefill
    return stats
