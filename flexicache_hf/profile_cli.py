"""`flexicache profile`: measure a model's head stability and write its HeadProfile JSON (and pictures).

    flexicache profile --model smollm2 --samples 6 --prompt-tokens 2048 --decode-steps 128 \\
        --topk-pages 16 --unstable 0.25 --seed 0 --out profiles/smollm2-135m-instruct.json --plots docs/

--model takes "smollm2", "qwen-coder-0.5b" (the offline GGUF models of flexicache_hf.models) or a
local Hugging Face folder / hub id. The procedure is flexicache_hf.profiling's (docs/method.md, "Profiling").
Arguments are checked before any model loads (exit 2, a message naming the value and what to change); a
head count larger than the model's is refused as soon as its config is loaded, before profiling starts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

from flexicache_hf.stability import WINDOW

ALIASES_SHORT = {"smollm2": "smollm2", "qwen-coder-0.5b": "qwen-coder"}
MIN_DECODE_STEPS = 2 * WINDOW  # held-out recall compares even and odd 16-step chunks: two chunks at least


def _count_or_fraction(text: str) -> int | float:
    """--unstable: an integer ("23", or a whole number above 1 such as "64.0") is a count of heads, anything
    else ("0.25", "1.0") a fraction of all KV heads, as `stability.resolve_count` reads them."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number: give a count of heads (e.g. 23) or a fraction in (0, 1] (e.g. 0.25)") from None
    if math.isfinite(value) and value.is_integer() and (value > 1 or text.strip().lstrip("+-").isdigit()):
        return int(value)
    return value


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="flexicache profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="smollm2 | qwen-coder-0.5b | qwen-coder-1.5b | a local HF folder or hub id")
    p.add_argument("--samples", type=int, default=4, help="prompts (text windows) to profile on (default 4)")
    p.add_argument("--prompt-tokens", type=int, default=2048, help="prompt length in tokens (default 2048)")
    p.add_argument("--decode-steps", type=int, default=128, help="decode steps recorded per sample (default 128)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per page (default 16)")
    p.add_argument("--topk-pages", type=int, default=16, help="K, pages in each head's top-K set (default 16)")
    p.add_argument("--unstable", type=_count_or_fraction, default=0.25,
                   help="M: a count of heads (e.g. 64) or a fraction of all KV heads (default 0.25)")
    p.add_argument("--seed", type=int, default=0, help="seed of the text windows (default 0)")
    p.add_argument("--data", choices=("mixed", "prose", "code"), default="mixed",
                   help="CPython text: stdlib docstrings (prose), stdlib source (code), or both alternating")
    p.add_argument("--mode", choices=("teacher", "greedy"), default="teacher",
                   help="decode inputs: the text's next tokens (teacher forcing) or the model's greedy tokens")
    p.add_argument("--method", choices=("attention", "minmax"), default="attention",
                   help="top-K by exact attention mass (default) or by the MinMax score; both are recorded")
    p.add_argument("--group-reduce", choices=("sum", "max"), default="sum",
                   help="attention mass of a page over the GQA group: sum (default) or max")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is faster on a CPU shared with other jobs)")
    p.add_argument("--model-id", default=None, help="model id written in the profile (default: from the model)")
    p.add_argument("--out", default=None, help="profile JSON path (default: ./<model-id>.json)")
    p.add_argument("--plots", default=None, help="folder for profiling_<name>_heatmap.png and _rco.png")
    p.add_argument("--plot-name", default=None, help="<name> in the picture file names (default: from --model)")
    p.add_argument("--records", default=None, help="also save the raw top-K records here (torch.save)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    return run(args, parser)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any model loads, what would fail (or measure nothing) later: parser.error, exit 2."""
    ps, K, steps = args.page_size, args.topk_pages, args.decode_steps
    if ps < 1 or ps & (ps - 1):
        parser.error(f"--page-size {ps}: give a power of two >= 1, e.g. 16 (the cache's page size)")
    if K < 1:
        parser.error(f"--topk-pages {K}: give K >= 1, the pages in each head's top-K set, e.g. 16")
    if args.samples < 1:
        parser.error(f"--samples {args.samples}: give >= 1 prompts to profile on, e.g. 4")
    if steps < MIN_DECODE_STEPS:
        parser.error(f"--decode-steps {steps}: give >= {MIN_DECODE_STEPS}, e.g. 128: stability is measured over "
                     f"{WINDOW}-step chunks and the held-out recall compares even and odd chunks, so two chunks at least")
    if args.prompt_tokens < (K + 1) * ps:
        parser.error(f"--prompt-tokens {args.prompt_tokens} holds {max(args.prompt_tokens, 0) // ps} full pages of {ps} "
                     f"tokens, but a top-K of --topk-pages {K} measures something only with more than {K} to choose "
                     f"from: give --prompt-tokens >= {(K + 1) * ps}, or a smaller --topk-pages or --page-size")
    u = args.unstable
    if isinstance(u, int) and u < 1 or isinstance(u, float) and not 0 < u <= 1:
        parser.error(f"--unstable {u}: give a count of heads >= 1 (e.g. 23) or a fraction in (0, 1] (e.g. 0.25)")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}: give >= 1 torch CPU threads (1 is fastest on a shared CPU)")
    _check_device(parser, args.device)


def _check_device(parser: argparse.ArgumentParser, device: str | None) -> None:
    import torch

    if device is None:
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        parser.error(f"--device {device!r} is not a torch device: give cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available here; use --device cpu")


def check_unstable_count(parser: argparse.ArgumentParser, args: argparse.Namespace, config) -> None:
    """A head count above the model's heads: refused once its config is known, before profiling starts."""
    from flexicache_hf.profile_recorder import num_heads

    L, H = num_heads(config)
    if isinstance(args.unstable, int) and args.unstable > L * H:
        parser.error(f"--unstable {args.unstable}: the model has {L * H} KV heads ({L} layers x {H}); give a count "
                     f"<= {L * H} or a fraction in (0, 1], e.g. 0.25")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    import torch

    from flexicache_hf import models, profiling

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer = models.load_model(args.model, dtype=getattr(torch, args.dtype))
    check_unstable_count(parser or build_parser(), args, model.config)
    model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load_s = time.perf_counter() - t0
    model_id = args.model_id or models.MODEL_ALIASES.get(args.model.lower()) or profiling.model_name(model)
    records: list = []
    profile = profiling.profile_model(
        model, tokenizer, samples=args.samples, prompt_tokens=args.prompt_tokens,
        decode_steps=args.decode_steps, page_size=args.page_size, topk_pages=args.topk_pages,
        unstable=args.unstable, seed=args.seed, data=args.data, mode=args.mode, method=args.method,
        group_reduce=args.group_reduce, model_id=model_id, progress=not args.quiet, records_out=records,
    )
    profile.metadata["command"] = "flexicache profile " + " ".join(_argv(args))
    profile.metadata["load_s"] = round(load_s, 1)
    out = args.out or f"{model_id.split('/')[-1].lower()}.json"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    profile.save(out)
    if args.records:
        records[0].save(args.records)
    if args.plots:
        _plots(args, profile, records[0], model_id)
    print(json.dumps(_summary(profile, out, model_id), indent=1))
    return 0


def _plots(args: argparse.Namespace, profile, records, model_id: str) -> None:
    from flexicache_hf import profile_plots

    os.makedirs(args.plots, exist_ok=True)
    name = args.plot_name or ALIASES_SHORT.get(args.model.lower()) or model_id.split("/")[-1].lower()
    heat = os.path.join(args.plots, f"profiling_{name}_heatmap.png")
    curves = os.path.join(args.plots, f"profiling_{name}_rco.png")
    profile_plots.plot_stability_heatmap(profile, heat)
    profile_plots.plot_rco_curves(
        records, profile_plots.pick_curve_heads(profile), curves, method=args.method, profile=profile,
        title=f"{model_id.split('/')[-1]}: RCO vs step offset (top-{args.topk_pages} pages, {args.method})")
    print(f"pictures: {heat}, {curves}")


def _summary(profile, out: str, model_id: str) -> dict:
    m = profile.metadata
    return {
        "profile": out,
        "model_id": model_id,
        "unstable": f"{len(profile.unstable)} of {profile.num_layers * profile.num_kv_heads} KV heads",
        "heldout_recall": m["recall"]["heldout_recall"],
        "heldout_recall_swapped": m["recall"]["heldout_recall_swapped"],
        "insample_recall": m["recall"]["insample_recall"],
        "chance": m["recall"]["chance"],
        "minmax_heldout_recall": m["methods"]["minmax"]["heldout_recall"],
        "method_overlap": m["method_overlap"],
        "chunks": m["chunks"],
        "elapsed_s": m["elapsed_s"],
        "load_s": m["load_s"],
    }


def _argv(args: argparse.Namespace) -> list[str]:
    """The flags that rebuild this run (written into the profile's metadata)."""
    keys = ["model", "samples", "prompt_tokens", "decode_steps", "page_size", "topk_pages", "unstable", "seed",
            "data", "mode", "method", "group_reduce", "dtype"]
    return [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in keys]


if __name__ == "__main__":
    raise SystemExit(main())
