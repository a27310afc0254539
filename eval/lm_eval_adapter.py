"""lm-evaluation-harness adapter: model type "flexicache" (an `HFLM` whose generations run on a method's cache).

lm-eval has no plugin entry point for models, so the registration happens when this module is imported
(only if `lm_eval` is importable; nothing here imports it otherwise). Three ways to use it:

    # 1. the lm_eval command line, through this module (it registers, then runs lm_eval's own CLI):
    python -m flexicache_hf.eval.lm_eval_adapter run --model flexicache --device cpu --batch_size 1 \\
        --model_args pretrained=smollm2,method=flexicache,budget=256,threads=1 \\
        --tasks flexicache_niah_single,flexicache_qa_code --include_path $(python -m flexicache_hf.eval.lm_eval_adapter --tasks-dir) \\
        --metadata '{"lengths": [4096], "samples": 3}'

    # 2. Python:
    import flexicache_hf.eval.lm_eval_adapter as A; A.register()
    lm_eval.simple_evaluate(model="flexicache", model_args="pretrained=smollm2,budget=256", tasks=[...],
                            task_manager=lm_eval.tasks.TaskManager(include_path=A.TASKS_DIR, metadata={...}))

    # 3. `lm_eval --model flexicache ...` works in any process that imported this module first.

model_args: pretrained (smollm2 | qwen-coder-0.5b | a local HF folder), method (any name of
flexicache_hf.eval.methods: dense, flexicache, flexicache_no_rerank, flexicache_all_stable, quest,
flexicache_random_unstable, streamingllm, snapkv, duo_attention), budget (tokens per KV head, or "full"), page_size,
sketch_bits (FlexiCache methods score pages by per-token key sketches of that many bits; default 2, the
cache's default; 0: the MinMax bound), sketch_score (mass | max: how the sketches rank pages), profile (a profile JSON; default the shipped one), dtype, threads, plus HFLM's own (max_length, ...).
The device comes from lm_eval's --device (or `device=` in model_args when calling simple_evaluate
without one), as for its "hf" model. Only generate_until requests use the method's cache (greedy; one row at a time, the
prefill shared the way the harness's runner does it); loglikelihood requests are full forwards, which are
dense for every method by construction (prefill is dense attention).

The task YAMLs in eval/lm_eval_tasks/ generate their data offline with flexicache_hf.eval.tasks, sized
with the tokenizer of `pretrained` (metadata: lengths / max_seq_lengths, samples, seed).
"""

from __future__ import annotations

import importlib.util
import os
import sys

from flexicache_hf.config import DEFAULT_SKETCH_BITS

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")
MODEL_NAME = "flexicache"
_REGISTERED = None


def available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def _define():
    import torch
    from lm_eval.models.huggingface import HFLM

    import flexicache_hf  # noqa: F401  (registers attn_implementation="flexicache")
    from flexicache_hf.eval import methods as M
    from flexicache_hf.eval import runner
    from flexicache_hf.eval.presets import parse_budget
    from flexicache_hf.models import cache_dir, load_model

    class FlexiCacheLM(HFLM):
        """HFLM whose generate_until decodes on a FlexiCache (or any method of flexicache_hf.eval.methods)."""

        def __init__(self, pretrained: str = "smollm2", method: str = "flexicache", budget="1024", page_size: int = 16,
                     profile: str | None = None, device: str = "cpu", dtype: str = "float32", threads: int | None = None,
                     max_new_tokens_full: int = 256, sketch_bits: int = DEFAULT_SKETCH_BITS, sketch_score: str = "mass",
                     **kwargs):
            if threads:
                torch.set_num_threads(int(threads))
            torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            model, tok = load_model(pretrained, dtype=torch_dtype, attn_implementation="flexicache")
            model.to(device)
            self.method = M.get_methods([method], sketch_bits=int(sketch_bits), sketch_score=sketch_score)[0]
            self.budget = parse_budget(budget)
            prof = runner.resolve_profile(model, tok, profile, cache_dir() / "eval_profiles")
            self.ctx = M.Context(model, prof, page_size=int(page_size), max_new_tokens=int(max_new_tokens_full))
            self.eos = runner.eos_ids(model, tok)
            kwargs.pop("tokenizer", None)
            kwargs.setdefault("max_length", getattr(model.config, "max_position_embeddings", None))
            super().__init__(pretrained=model, tokenizer=tok, **kwargs)

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            if generation_kwargs.get("do_sample"):
                raise ValueError("the flexicache lm-eval model decodes greedily: set do_sample: false")
            mask = generation_kwargs.get("attention_mask")
            rows = []
            for i in range(context.shape[0]):
                ids = context[i : i + 1]
                if mask is not None:
                    ids = ids[:, mask[i].bool()]  # drop left padding: one row at a time
                prefill = runner.run_prefill(self.model, ids)
                self.ctx.max_new_tokens = max(1, max_length - context.shape[1])
                cache, first = runner.method_cache(self.method, self.ctx, self.budget, prefill, self.model)
                stop_fn = _stopper(self.tokenizer, stop) if stop else None
                new = runner.greedy_decode(self.model, cache, first, prefill.length, max_length - context.shape[1], self.eos, stop_fn)
                rows.append(torch.cat([context[i], torch.tensor(new, dtype=context.dtype, device=context.device)]))
            width = max(r.shape[0] for r in rows)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            return torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[0]), value=pad) for r in rows])

        def get_model_info(self) -> dict:
            info = super().get_model_info() if hasattr(super(), "get_model_info") else {}
            info.update({"flexicache_method": self.method.name, "flexicache_budget": runner.budget_key(self.budget)})
            return info

    return FlexiCacheLM


def _stopper(tokenizer, stop: list[str]):
    def fn(tokens: list[int]) -> bool:
        tail = tokenizer.decode(tokens[-16:], skip_special_tokens=True)
        return any(s and s in tail for s in stop)

    return fn


def register():
    """Register model type "flexicache" with lm-eval (idempotent); returns the class, or None without lm_eval."""
    global _REGISTERED
    if _REGISTERED is not None:
        return _REGISTERED
    if not available():
        return None
    from lm_eval.api.registry import register_model

    cls = _define()
    register_model(MODEL_NAME)(cls)
    _REGISTERED = cls
    return cls


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--tasks-dir"]:
        print(TASKS_DIR)
        return 0
    if not available():
        print("lm_eval is not installed: pip install lm-eval", file=sys.stderr)
        return 2
    register()
    if argv[:1] == ["run"]:
        argv = argv[1:]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


if available():  # importing this module is what makes `--model flexicache` known to lm-eval
    register()

if __name__ == "__main__":
    raise SystemExit(main())
