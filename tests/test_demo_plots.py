"""`flexicache demo --plots DIR`: its arguments are checked before any model loads, and on SmolLM2 it writes the
three pictures (flexicache_hf.viz) with the pass key's pages marked."""

import sys

import pytest
import torch

from flexicache_hf.cli import main


class ModelLoaded(AssertionError):
    pass


@pytest.fixture
def no_model(monkeypatch):
    def load_model(*args, **kwargs):
        raise ModelLoaded("a model was loaded: the argument was not checked at parse time")

    monkeypatch.setattr("flexicache_hf.models.load_model", load_model)


def _rejected(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(["demo", *argv])
    assert e.value.code == 2
    return capsys.readouterr().err


def test_plots_into_a_file_is_refused_before_loading(no_model, capsys, tmp_path):
    path = tmp_path / "a_file.png"
    path.write_text("")
    err = _rejected(capsys, "--plots", str(path))
    assert "--plots" in err and str(path) in err and "folder" in err


def test_plots_without_matplotlib_names_the_extra(no_model, capsys, monkeypatch, tmp_path):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    err = _rejected(capsys, "--plots", str(tmp_path))
    assert "--plots" in err and "pip install 'flexicache-hf[viz]'" in err


def test_good_plot_arguments_reach_the_model(no_model, tmp_path):
    with pytest.raises(ModelLoaded):
        main(["demo", "--plots", str(tmp_path / "new" / "folder")])
    assert (tmp_path / "new" / "folder").is_dir()


def test_needle_pages_cover_the_pass_key(smollm2):
    from flexicache_hf.demo import needle_pages, passkey_prompt

    _, tok = smollm2
    prompt, key = passkey_prompt(tok, 800, 0.5, 0)
    ids = tok(prompt, add_special_tokens=False).input_ids
    pages = needle_pages(tok, prompt, key, 16)
    window = tok.decode(ids[pages[0] * 16:(pages[-1] + 1) * 16])
    assert window.count(key) == 2  # both mentions of the key, in consecutive pages
    assert pages == list(range(pages[0], pages[-1] + 1)) and len(pages) <= 3


def test_demo_writes_the_pictures(smollm2, tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["demo", "--plots", str(tmp_path), "--tokens", "700", "--new-tokens", "18", "--topk-pages", "8",
                     "--rerank-interval", "8"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code in (0, 1)  # 1: FlexiCache missed the key (the picture is still written)
    for name in ("memory.png", "page_selection.png", "head_stability.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
        assert str(tmp_path / name) in out
    assert "17 decode steps recorded" in out
