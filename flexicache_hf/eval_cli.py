"""`flexicache eval`: accuracy retention of FlexiCache vs dense, its ablations and eviction peers.

    flexicache eval --preset ci --out runs/ci                     # CPU, minutes (what tests/test_eval.py runs)
    flexicache eval --preset cpu --threads 1 --out runs/cpu       # SmolLM2 at 4k on 2 CPU cores, ~1.5 h
    flexicache eval --preset full --device cuda --out runs/full   # SmolLM2 to 8k, Qwen2.5-Coder-0.5B to 32k, ~3 h
    flexicache eval --report-only --out runs/full                 # tables and plots from results.json

Flags after --preset override the preset for every model in it (--model keeps only that model's job, or
runs the preset's first job on another model, e.g. a local HF folder). Results: <out>/results.json (resumable: a rerun skips (task, sample, method, budget) records already
there), <out>/report.md (tables), <out>/score_vs_budget.png and <out>/fidelity.png. Tasks, methods and
metrics: flexicache_hf.eval (repo folder eval/) and docs/accuracy.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from flexicache_hf.cli import available_device, check_knobs, csv_of, load_profile, positive_int
from flexicache_hf.config import DEFAULT_SKETCH_BITS, SKETCH_BITS, SKETCH_SCORES

FIDELITY_KINDS = ("docs", "code")  # the texts of runner.fidelity_text


def _budget(text: str) -> int | str:
    """`type=` for a budget: tokens per KV head (>= 1) or "full"."""
    if text.lower() == "full":
        return "full"
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a budget: give a whole number of tokens >= 1, or 'full'")
    return value


def _fidelity_kind(text: str) -> str:
    if text not in FIDELITY_KINDS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fidelity text: use {' or '.join(FIDELITY_KINDS)}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flexicache eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ci", help="ci | cpu | full (default ci)")
    p.add_argument("--out", default=None, help="output folder (default runs/<preset>)")
    p.add_argument("--model", default=None, help="smollm2 | qwen-coder-0.5b | qwen-coder-1.5b | a local HF folder: run only this model")
    p.add_argument("--tasks", type=csv_of(str), default=None, help="comma-separated task names (see flexicache_hf.eval.tasks)")
    p.add_argument("--lengths", type=csv_of(positive_int), default=None, help="prompt lengths in tokens, e.g. 4096,8192")
    p.add_argument("--samples", type=positive_int, default=None, help="samples per task and length")
    p.add_argument("--methods", type=csv_of(str), default=None, help="comma-separated methods (see flexicache_hf.eval.methods)")
    p.add_argument("--budgets", type=csv_of(_budget), default=None, help="budgets in tokens per KV head, 'full' = whole context")
    p.add_argument("--fidelity-prompt", type=positive_int, default=None, help="fidelity: prompt tokens")
    p.add_argument("--fidelity-steps", type=positive_int, default=None, help="fidelity: teacher-forced decode steps")
    p.add_argument("--fidelity-kinds", type=csv_of(_fidelity_kind), default=None, help="fidelity text: docs,code")
    p.add_argument("--fidelity-budgets", type=csv_of(_budget), default=None, help="fidelity budgets (default: the preset's)")
    p.add_argument("--fidelity-methods", type=csv_of(str), default=None, help="fidelity methods (default: the preset's)")
    p.add_argument("--no-fidelity", action="store_true", help="skip the long-generation fidelity run")
    p.add_argument("--no-tasks", action="store_true", help="only the fidelity run")
    p.add_argument("--device", type=available_device, default=None, help="cpu | cuda (default: the preset's)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="default: the preset's")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (1 is fastest on a busy 2-core machine)")
    p.add_argument("--profile", default=None, help="head profile JSON (default: the shipped one of the model)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--score-spread", type=float, default=1.0,
                   help="with --sketch-bits 0: MinMax page scores q.c + x |q|.r (1.0: the bound); methods get a _spread<x> suffix")
    p.add_argument("--sketch-bits", type=int, default=DEFAULT_SKETCH_BITS, choices=SKETCH_BITS,
                   help="FlexiCache pages scored by a per-token key sketch of this many bits per channel (default 2, "
                        "the cache's default; 0: the paper's MinMax bound); methods get a _sketch<b>mass suffix "
                        "(_sketch<b> with --sketch-score max)")
    p.add_argument("--sketch-score", default="mass", choices=SKETCH_SCORES,
                   help="with --sketch-bits: rank pages by the attention mass the sketches predict (default) or by the best sketched q.k")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated tasks and texts")
    p.add_argument("--no-resume", action="store_true", help="start a fresh results.json")
    p.add_argument("--no-shared-prefill", action="store_true", help="a full prefill per (method, budget) instead of one per sample")
    p.add_argument("--no-stop-blank-line", action="store_true",
                   help="decode to EOS / the token limit only (default: also stop once the answer is followed by an empty line)")
    p.add_argument("--report-only", action="store_true", help="only rewrite report.md and the plots from results.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, decode FlexiCache steps eagerly (default: replayed from CUDA graphs, same outputs)")
    return p


def plan(args) -> tuple[dict, list[dict]]:
    from flexicache_hf.eval.presets import get_preset, parse_budget

    preset = get_preset(args.preset)
    jobs = preset["jobs"]
    if args.model:
        same = [j for j in jobs if j["model"] == args.model]
        jobs = same or [dict(jobs[0], model=args.model)]
    for j in jobs:
        for key in ("tasks", "lengths", "samples", "methods"):
            if getattr(args, key) is not None:
                j[key] = getattr(args, key)
        if args.budgets is not None:
            j["budgets"] = args.budgets
            j.pop("method_budgets", None)
        j["budgets"] = [parse_budget(b) for b in j["budgets"]]
        j["method_budgets"] = {m: [parse_budget(b) for b in bs] for m, bs in (j.get("method_budgets") or {}).items()}
        fid = j.get("fidelity") or {}
        for key, flag in (("prompt_tokens", "fidelity_prompt"), ("steps", "fidelity_steps"), ("kinds", "fidelity_kinds"),
                          ("budgets", "fidelity_budgets"), ("methods", "fidelity_methods")):
            if getattr(args, flag) is not None:
                fid[key] = getattr(args, flag)
        fid["budgets"] = [parse_budget(b) for b in fid.get("budgets", [])]
        j["fidelity"] = None if args.no_fidelity or not fid.get("steps") else fid
    preset["device"] = args.device or preset["device"]
    preset["dtype"] = args.dtype or preset["dtype"]
    return preset, jobs


def check_args(parser: argparse.ArgumentParser, args) -> tuple[dict, list[dict]]:
    """plan(args), after every check that needs no model: a bad flag stops the command here, not once a
    model has loaded (or, worse, after the first records were written)."""
    from flexicache_hf.eval import methods as M
    from flexicache_hf.eval.tasks import ALL_TASKS

    def methods(flag, names):
        try:
            return M.get_methods(names)
        except ValueError as e:  # an unknown name
            parser.error(f"{flag}: {e}")

    check_knobs(parser, page_size=args.page_size, score_spread=args.score_spread, sketch_bits=args.sketch_bits,
                sketch_score=args.sketch_score)
    if args.profile is not None:
        args.profile = load_profile(parser, args.profile)
    try:
        preset, jobs = plan(args)
    except ValueError as e:  # an unknown preset
        parser.error(f"--preset: {e}")
    if args.device is None:  # --device itself was checked by its type; the preset's is checked here
        try:
            available_device(preset["device"])
        except argparse.ArgumentTypeError as e:
            parser.error(f"--preset {args.preset} runs on {e}")
    for job in jobs:
        unknown = [t for t in job["tasks"] if t not in ALL_TASKS]
        if unknown:
            parser.error(f"--tasks: unknown tasks {unknown}; known: {', '.join(ALL_TASKS)}")
        runs = [(m, job["method_budgets"].get(m.name, job["budgets"])) for m in methods("--methods", job["methods"])]
        if job["fidelity"]:
            runs += [(m, job["fidelity"]["budgets"]) for m in methods("--fidelity-methods", job["fidelity"]["methods"])]
        # FlexiCache, the page oracles and the Duo peer (sized in FlexiCache pages) need budgets in whole pages
        for m, budgets in runs:
            for b in budgets:
                if isinstance(m, (M.FlexiCacheMethod, M.OraclePages, M.DuoAttention)) and b is not None and b % args.page_size:
                    parser.error(f"budget {b} of {m.name} is not a multiple of --page-size {args.page_size}: "
                                 "give budgets in whole pages, or another --page-size")
    return preset, jobs


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = args.out or os.path.join("runs", args.preset)
    from flexicache_hf.eval.report import load, write_report

    if args.report_only:
        results = Path(out) / "results.json"
        if not results.is_file():
            parser.error(f"--report-only: {results} does not exist: point --out at the folder of an earlier run")
        try:
            load(out)
        except ValueError as e:  # a corrupted results.json
            parser.error(str(e))
        print(f"wrote {write_report(out)}")
        return 0
    t_start = time.perf_counter()
    import torch

    from flexicache_hf.eval import runner

    preset, jobs = check_args(parser, args)
    try:
        store = runner.ResultStore(out, resume=not args.no_resume)
    except ValueError as e:  # a corrupted results.json
        parser.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    command = "flexicache eval " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    for job in jobs:
        _run_job(args, preset, job, store, out, command)
    path = write_report(out)
    print(f"[eval] done in {time.perf_counter() - t_start:.1f} s: {store.path}, {path}", flush=True)
    return 0


def _run_job(args, preset, job, store, out, command) -> None:
    """One model of the preset: load it, run its tasks and its fidelity run, record the run."""
    import torch

    import flexicache_hf  # noqa: F401  (registers attn_implementation="flexicache")
    from flexicache_hf.eval import methods as M
    from flexicache_hf.eval import runner, tasks
    from flexicache_hf.models import load_model

    t0 = time.perf_counter()
    device, dtype = preset["device"], getattr(torch, preset["dtype"])
    model, tok = load_model(job["model"], dtype=dtype, attn_implementation="flexicache")
    model.to(device)
    if device.startswith("cuda") and not args.no_cuda_graphs:
        flexicache_hf.enable_cuda_graphs(model)  # FlexiCache decode steps only; identical outputs (tests/test_graphs.py)
    name = runner.model_name(model)
    print(f"[eval] {name} on {device} ({preset['dtype']}), loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    profile = runner.resolve_profile(model, tok, args.profile, out)
    n_unstable = len(profile.unstable)
    print(f"[eval] head profile: {n_unstable} of {profile.num_layers * profile.num_kv_heads} KV heads unstable "
          f"({profile.metadata.get('source', profile.model_id)})", flush=True)
    methods = lambda names: M.get_methods(names, args.score_spread, args.sketch_bits, args.sketch_score)  # noqa: E731
    stats, progress = {}, not args.quiet
    if not args.no_tasks:
        t1 = time.perf_counter()
        ds = tasks.build_dataset(tok, job["tasks"], job["lengths"], job["samples"], seed=args.seed)
        print(f"[eval] {len(ds)} prompts built in {time.perf_counter() - t1:.1f} s "
              f"(fingerprint {tasks.dataset_fingerprint(ds)})", flush=True)
        stats["tasks"] = runner.run_tasks(
            model, tok, ds, methods(job["methods"]), job["budgets"], store, profile,
            method_budgets=job["method_budgets"], page_size=args.page_size, shared_prefill=not args.no_shared_prefill,
            stop_blank_line=not args.no_stop_blank_line, progress=progress,
        )
        print(f"[eval] tasks: {stats['tasks']}", flush=True)
    fid = job.get("fidelity")
    if fid:
        stats["fidelity"] = runner.run_fidelity(
            model, tok, methods(fid["methods"]), fid["budgets"], store, profile,
            prompt_tokens=fid["prompt_tokens"], steps=fid["steps"], kinds=fid["kinds"], seed=args.seed,
            page_size=args.page_size, progress=progress,
        )
        print(f"[eval] fidelity: {stats['fidelity']}", flush=True)
    store.add_run({
        "command": command, "model": name, "preset": args.preset, "job": dict(job),
        "wall_s": round(time.perf_counter() - t0, 1), "env": runner.environment(model),
        "profile_source": f"{profile.metadata.get('source', '')} ({n_unstable} unstable)", "stats": stats,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    })


if __name__ == "__main__":
    raise SystemExit(main())
