"""The `flexicache` command line rejects bad arguments at parse time (exit 2, a message naming the value and
what to change), before any model loads: load_model is replaced by a stub that fails the test if called."""

import json

import pytest
import torch

from flexicache_hf.cli import main


class ModelLoaded(AssertionError):
    pass


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    def load_model(*args, **kwargs):
        raise ModelLoaded("a model was loaded: the argument was not checked at parse time")

    monkeypatch.setattr("flexicache_hf.models.load_model", load_model)
    # the same answer on a GPU machine: "--device cuda" must be refused as on a CPU-only one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def rejected(capsys, *argv) -> str:
    """stderr of a command line that must exit with argparse's usage error (2)."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err


def test_unknown_command(capsys):
    err = rejected(capsys, "bogus")
    assert "unknown command 'bogus'" in err
    assert "usage: flexicache" in err


# knobs checked by FlexiCacheConfig: its rule is its own wording, the CLI names the flag and the value
@pytest.mark.parametrize(
    "args, expected",
    [
        (["--page-size", "3"], ["--page-size 3", "invalid"]),
        (["--topk-pages", "0"], ["--topk-pages 0", "invalid"]),
        (["--rerank-interval", "0"], ["--rerank-interval 0", "invalid"]),
        (["--tokens", "-5"], ["--tokens", "-5", ">= 1"]),
        (["--depth", "7"], ["--depth", "7", "between 0 and 1"]),
        (["--new-tokens", "0"], ["--new-tokens", "0", ">= 1"]),
        (["--profile", "/missing/profile.json"], ["--profile", "/missing/profile.json"]),
        (["--device", "cuda"], ["--device", "CUDA is not available", "--device cpu"]),
        (["--device", "gpu"], ["--device", "'gpu'", "cpu"]),
    ],
)
def test_demo_rejects_at_parse_time(capsys, args, expected):
    err = rejected(capsys, "demo", *args)
    for text in expected:
        assert text in err


def test_demo_rejects_a_profile_that_is_not_json(capsys, tmp_path):
    path = tmp_path / "profile.json"
    path.write_text("not json")
    err = rejected(capsys, "demo", "--profile", str(path))
    assert "--profile" in err and str(path) in err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--page-size", "3"], ["--page-size 3", "invalid"]),
        (["--samples", "-1"], ["--samples", "-1", ">= 1"]),
        (["--samples", "0"], ["--samples", "0", ">= 1"]),
        (["--budgets", "abc"], ["--budgets", "'abc'", "'full'"]),
        (["--budgets", "0,256"], ["--budgets", "'0'", "'full'"]),
        (["--fidelity-budgets", "-16"], ["--fidelity-budgets", "'-16'"]),
        (["--budgets", "100"], ["100", "multiple of --page-size 16"]),
        (["--lengths", "0"], ["--lengths", "0", ">= 1"]),
        (["--threads", "0"], ["--threads", "0", ">= 1"]),
        (["--fidelity-steps", "0"], ["--fidelity-steps", "0", ">= 1"]),
        (["--fidelity-kinds", "prose"], ["--fidelity-kinds", "'prose'", "docs"]),
        (["--score-spread", "2"], ["--score-spread 2", "invalid"]),
        (["--sketch-bits", "2", "--score-spread", "0.5"], ["--score-spread 0.5", "invalid"]),
        (["--profile", "/missing/profile.json"], ["--profile", "/missing/profile.json"]),
        (["--device", "cuda"], ["CUDA is not available", "--device cpu"]),
        (["--preset", "full"], ["CUDA is not available", "--device cpu"]),  # the preset's device
        (["--preset", "bogus"], ["bogus", "ci"]),
        (["--methods", "dense,bogus"], ["--methods", "bogus", "flexicache"]),
        (["--fidelity-methods", "bogus"], ["--fidelity-methods", "bogus"]),
        (["--tasks", "bogus"], ["--tasks", "bogus", "niah_single"]),
    ],
)
def test_eval_rejects_at_parse_time(capsys, tmp_path, args, expected):
    err = rejected(capsys, "eval", "--out", str(tmp_path), *args)
    for text in expected:
        assert text in err


def test_eval_report_only_needs_results(capsys, tmp_path):
    err = rejected(capsys, "eval", "--report-only", "--out", str(tmp_path / "missing"))
    assert str(tmp_path / "missing" / "results.json") in err
    assert "--out" in err


@pytest.mark.parametrize("report_only", [True, False])
def test_eval_corrupted_results(capsys, tmp_path, report_only):
    path = tmp_path / "results.json"
    path.write_text('{"records": [')  # a run killed mid-write by something other than our atomic replace
    err = rejected(capsys, "eval", "--out", str(tmp_path), *(["--report-only"] if report_only else []))
    assert str(path) in err
    assert "delete it" in err and "--no-resume" in err


def test_good_arguments_reach_the_model(tmp_path, monkeypatch):
    """A guard against over-eager checks: the defaults (and a valid profile, budget list) pass."""
    from flexicache_hf.profiles import HeadProfile

    profile = tmp_path / "p.json"
    HeadProfile.all_stable(30, 3).save(profile)
    with pytest.raises(ModelLoaded):
        main(["demo", "--profile", str(profile)])
    with pytest.raises(ModelLoaded):
        main(["eval", "--out", str(tmp_path / "run"), "--budgets", "full,256", "--lengths", "512", "--samples", "2",
              "--profile", str(profile)])
