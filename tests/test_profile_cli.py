"""`flexicache profile`: the command line of flexicache_hf.profile_cli."""

from __future__ import annotations


def test_cli_parser():
    from flexicache_hf.profile_cli import build_parser

    args = build_parser().parse_args(["--model", "smollm2", "--unstable", "0.25", "--topk-pages", "16"])
    assert args.unstable == 0.25 and args.topk_pages == 16 and args.method == "attention"
    assert build_parser().parse_args(["--model", "x", "--unstable", "64"]).unstable == 64
