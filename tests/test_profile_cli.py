"""`flexicache profile` refuses bad arguments before any model loads (exit 2, a message naming the value and
what to change); a head count above the model's is refused once its config is loaded, before profiling runs.
load_model and profile_model are replaced by stubs that fail the test if they are reached unexpectedly."""

from __future__ import annotations

import types

import pytest
import torch

from flexicache_hf import cli, profile_cli


class ModelLoaded(AssertionError):
    pass


class Profiled(AssertionError):
    pass


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    def load_model(*args, **kwargs):
        raise ModelLoaded("a model was loaded: the argument was not checked at parse time")

    def profile_model(*args, **kwargs):
        raise Profiled("profiling started")

    monkeypatch.setattr("flexicache_hf.models.load_model", load_model)
    monkeypatch.setattr("flexicache_hf.profiling.profile_model", profile_model)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine


def rejected(capsys, *argv) -> str:
    """stderr of `flexicache profile --model smollm2 ARGV`, which must exit with argparse's usage error (2)."""
    with pytest.raises(SystemExit) as e:
        cli.main(["profile", "--model", "smollm2", *argv])
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--page-size", "0"], ["--page-size 0", "power of two >= 1"]),
        (["--page-size", "12"], ["--page-size 12", "power of two >= 1"]),
        (["--topk-pages", "0"], ["--topk-pages 0", ">= 1"]),
        (["--decode-steps", "0"], ["--decode-steps 0", ">= 32", "16-step chunks"]),
        (["--decode-steps", "16"], ["--decode-steps 16", ">= 32", "even and odd chunks"]),
        (["--samples", "0"], ["--samples 0", ">= 1"]),
        (["--prompt-tokens", "256"], ["--prompt-tokens 256", "--topk-pages 16", "--prompt-tokens >= 272"]),
        (["--prompt-tokens", "1000", "--topk-pages", "64"], ["--prompt-tokens 1000", "--prompt-tokens >= 1040"]),
        (["--unstable", "0"], ["--unstable 0", "count of heads >= 1", "fraction in (0, 1]"]),
        (["--unstable", "1.5"], ["--unstable 1.5", "fraction in (0, 1]"]),
        (["--unstable", "-3"], ["--unstable -3", "count of heads >= 1"]),
        (["--unstable", "nan"], ["--unstable nan", "fraction in (0, 1]"]),
        (["--unstable", "many"], ["--unstable", "'many'", "fraction in (0, 1]"]),
        (["--threads", "0"], ["--threads 0", ">= 1"]),
        (["--device", "gpu"], ["--device 'gpu'", "cpu"]),
        (["--device", "cuda"], ["--device cuda", "CUDA is not available", "--device cpu"]),
    ],
)
def test_profile_rejects_at_parse_time(capsys, args, expected):
    err = rejected(capsys, *args)
    for text in expected:
        assert text in err


def test_profile_rejects_a_head_count_above_the_model_before_profiling(capsys, monkeypatch):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    moved = []
    model = types.SimpleNamespace(config=config, to=moved.append)
    monkeypatch.setattr("flexicache_hf.models.load_model", lambda *a, **k: (model, None))
    err = rejected(capsys, "--unstable", "500")
    assert "--unstable 500" in err and "4 KV heads (2 layers x 2)" in err and "<= 4" in err
    assert moved == []  # refused as soon as the config was there
    with pytest.raises(Profiled):  # a count the model has goes through
        cli.main(["profile", "--model", "smollm2", "--unstable", "4", "--device", "cpu"])


def test_profile_good_arguments_reach_the_model():
    """A guard against over-eager checks: the defaults and the documented commands pass."""
    for argv in ([], ["--unstable", "64", "--topk-pages", "32", "--prompt-tokens", "3072", "--decode-steps", "128"],
                 ["--unstable", "1.0", "--page-size", "1", "--topk-pages", "1", "--prompt-tokens", "2",
                  "--decode-steps", "32", "--samples", "1", "--threads", "1", "--device", "cpu"]):
        with pytest.raises(ModelLoaded):
            profile_cli.main(["--model", "smollm2", *argv])


def test_cli_parser():
    args = profile_cli.build_parser().parse_args(["--model", "smollm2", "--unstable", "0.25", "--topk-pages", "16"])
    assert args.unstable == 0.25 and args.topk_pages == 16 and args.method == "attention"
    parse = lambda u: profile_cli.build_parser().parse_args(["--model", "x", "--unstable", u]).unstable  # noqa: E731
    assert parse("64") == 64 and isinstance(parse("64"), int)
    assert parse("64.0") == 64 and isinstance(parse("64.0"), int)  # a whole number above 1: a count
    assert parse("1") == 1 and isinstance(parse("1"), int)  # one head
    assert parse("1.0") == 1.0 and isinstance(parse("1.0"), float)  # every head, as stability.resolve_count reads it
