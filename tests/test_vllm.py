"""EasyQuant checkpoints in the real vLLM engine (CPU build), in process: outputs, errors, kernels.

Engines run in vLLM's default mode (torch.compile), as users run them; one test keeps eager mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from converters.convert import ConvertOptions, convert
from converters.tiny_model import build_tiny_model
from easyquant_vllm.format import is_vocab_module, layer_tensors, quantized_layers, read_quantization_config
from easyquant_vllm.kernels import KERNELS, CudaInt4Kernel, LayerSpec, TorchReferenceKernel
from easyquant_vllm.quant import QuantSpec, quantize_group
from easyquant_vllm.reference import dequantized_state_dict
from easyquant_vllm.safetensors_io import open_checkpoint
from tests.vllm_helpers import hf_logprobs, hf_sequence_logprobs, require_vllm, vllm_generate, vllm_prompt_logprobs

pytestmark = pytest.mark.slow

PROMPTS = [[5, 17, 42, 9, 100, 3], [200, 11, 7]]  # token ids (any ids < the tiny vocab of 512)


@pytest.fixture(scope="module", autouse=True)
def _vllm() -> None:
    require_vllm()


@pytest.fixture(scope="module")
def qwen2_eq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2: q/k/v biases, a different module layout from Llama, group size 64."""
    root = tmp_path_factory.mktemp("qwen2")
    src = build_tiny_model(root / "src", arch="qwen2", seed=1)
    convert(src, root / "eq", ConvertOptions(group_size=64), progress=False)
    return root / "eq"


@pytest.fixture(scope="module")
def llama_eq(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default conversion (version 3, groups of 32 or 64 per module within version 2's bits): compact steps,
    fractional zero points, column scales and outliers per layer where they pay (q/k/v each decides, gate/up
    together)."""
    dst = tmp_path_factory.mktemp("llama") / "eq"
    convert(tiny_llama, dst, progress=False)
    return dst


@pytest.fixture(scope="module")
def llama_eq_g32(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 3 in groups of 32 everywhere (``--bits-per-weight off``): every layer keeps its outlier rule, so the
    layer the malformed-checkpoint tests edit has outliers and a known group size."""
    dst = tmp_path_factory.mktemp("llama-g32") / "eq"
    convert(tiny_llama, dst, ConvertOptions(bits_per_weight=None), progress=False)
    return dst


@pytest.fixture(scope="module")
def llama_eq_v1(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("llama-v1") / "eq"
    convert(tiny_llama, dst, ConvertOptions(format_version=1), progress=False)
    return dst


def _check_against_hf(model_dir: Path, quantization: str | None, atol: float, enforce_eager: bool = False) -> None:
    gens = vllm_generate(model_dir, PROMPTS, quantization=quantization, enforce_eager=enforce_eager)
    sd = dequantized_state_dict(model_dir)
    for prompt, gen in zip(PROMPTS, gens, strict=True):
        hf_tokens, hf_lp = hf_logprobs(model_dir, sd, prompt, gen.token_ids)
        assert gen.token_ids == hf_tokens  # greedy tokens identical
        diff = max(abs(a - b) for a, b in zip(gen.logprobs, hf_lp, strict=True))
        assert diff <= atol, f"max |dlogprob| {diff:.2e}"


@pytest.mark.parametrize("quantization", [None, "easyquant"])
def test_vllm_llama_matches_hf_reference(llama_eq: Path, quantization: str | None) -> None:
    # Merged qkv_proj / gate_up_proj; float32 engine (reference kernel): identical up to fp32 noise.
    _check_against_hf(llama_eq, quantization, atol=1e-4)


def test_vllm_format_version_1_still_loads(llama_eq_v1: Path) -> None:
    assert json.loads((llama_eq_v1 / "config.json").read_text())["quantization_config"]["format_version"] == 1
    _check_against_hf(llama_eq_v1, "easyquant", atol=1e-4)


def test_vllm_eager_mode_matches_hf_reference(llama_eq: Path) -> None:
    _check_against_hf(llama_eq, "easyquant", atol=1e-4, enforce_eager=True)  # vLLM's debugging mode still works


def test_vllm_qwen2_with_biases_matches_hf_reference(qwen2_eq: Path) -> None:
    _check_against_hf(qwen2_eq, "easyquant", atol=1e-4)


@pytest.fixture(scope="module")
def decisive_eq(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llama whose next-token distributions are decisive (top-1 probability ~0.5, like a trained
    model's), so that its logprobs say something about the kernel. (Source dir, its conversion.)"""
    root = tmp_path_factory.mktemp("decisive")
    src = build_tiny_model(root / "src", lm_head_std=0.3)
    convert(src, root / "eq", progress=False)
    return src, root / "eq"


CPU_INT4 = [k for k in KERNELS if k not in (CudaInt4Kernel, TorchReferenceKernel)]


@pytest.mark.parametrize("kernel", [k.name for k in CPU_INT4])
def test_vllm_bf16_int4_kernel_close_to_reference(decisive_eq: tuple[Path, Path], kernel: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # Every int4 CPU kernel this machine can run, forced in turn, in a bf16 engine in vLLM's default mode.
    # Teacher-forced: the logprobs vLLM gives the exact fp32 reference's own greedy tokens, so no argmax
    # (and no near-tie) is involved. Measured max |dlogprob|: 0.07 (cpu-wna16) and 0.11 (torch-int4-cpu),
    # all from bf16 rounding (activations, attention, logits of magnitude ~5).
    src, eq = decisive_eq
    cls = next(k for k in CPU_INT4 if k.name == kernel)
    # The checkpoint's own linear layers (format version, zero points, group size); EASYQUANT_KERNEL forces the
    # kernel of those, the 8-bit lm_head keeps its own choice.
    with open_checkpoint(eq) as ckpt:
        for prefix, qw in quantized_layers(ckpt, read_quantization_config(eq)):
            ok, why = cls.can_implement(LayerSpec.of(qw, torch.bfloat16, "cpu"))
            if not ok and not is_vocab_module(prefix):
                pytest.skip(f"{kernel} cannot run {prefix} of the default conversion on this machine: {why}")
    sd = dequantized_state_dict(eq)
    sequences = [p + hf_logprobs(eq, sd, p, [0] * 8)[0] for p in PROMPTS]  # prompt + the reference's greedy tokens
    ref = [hf_sequence_logprobs(eq, sd, s) for s in sequences]
    monkeypatch.setenv("EASYQUANT_KERNEL", kernel)
    got = vllm_prompt_logprobs(eq, sequences, dtype="bfloat16")
    diff = max(abs(a - b) for r, g in zip(ref, got, strict=True) for a, b in zip(r, g, strict=True))
    assert diff < 0.3, f"{kernel}: bf16 max |dlogprob| {diff:.3f} against the fp32 reference"
    # The bound can see a real error: the unquantized model differs from the quantized reference by more.
    unquantized = [hf_sequence_logprobs(src, None, s) for s in sequences]
    quant_effect = max(abs(a - b) for r, u in zip(ref, unquantized, strict=True) for a, b in zip(r, u, strict=True))
    assert quant_effect > 3 * 0.3, f"quantization changes logprobs by only {quant_effect:.3f}: the bound is too loose"


@pytest.fixture(scope="module", params=[8, 4], ids=["int8-head", "int4-head"])
def tied_lm_head_eq(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Qwen2 with tied embeddings, converted with ``lm_head=True`` (the default 8 bits, and 4): the one
    vocabulary matrix is quantized and serves both the input lookups and the logits. (Source dir, its conversion.)"""
    root = tmp_path_factory.mktemp("tied-lm-head")
    src = build_tiny_model(root / "src", arch="qwen2", seed=3, tie_word_embeddings=True)
    convert(src, root / "eq", ConvertOptions(group_size=64, lm_head=True, lm_head_bits=request.param), progress=False)
    return src, root / "eq"


def test_vllm_quantized_tied_lm_head_matches_hf_reference(tied_lm_head_eq: tuple[Path, Path]) -> None:
    # float32 engine, compiled: lookups through easyquant::embedding, logits through the lm_head's kernel.
    src, eq = tied_lm_head_eq
    gens = vllm_generate(eq, PROMPTS, quantization="easyquant")
    sd = dequantized_state_dict(eq)
    unquantized_vocab = {**sd, "model.embed_tokens.weight": load_file(str(src / "model.safetensors"))[
        "model.embed_tokens.weight"]}  # fmt: skip
    for prompt, gen in zip(PROMPTS, gens, strict=True):
        hf_tokens, hf_lp = hf_logprobs(eq, sd, prompt, gen.token_ids)
        assert gen.token_ids == hf_tokens
        diff = max(abs(a - b) for a, b in zip(gen.logprobs, hf_lp, strict=True))
        assert diff <= 1e-4, f"max |dlogprob| {diff:.2e}"
        # The served vocabulary matrix is the quantized one: the reference with the original one is far off
        # (measured 4.6e-3 with the 8-bit head, over 1e-2 with the 4-bit one).
        _, other = hf_logprobs(eq, unquantized_vocab, prompt, gen.token_ids)
        assert max(abs(a - b) for a, b in zip(gen.logprobs, other, strict=True)) > 10 * 1e-4


def test_vllm_bf16_quantized_tied_lm_head_close_to_reference(tmp_path: Path) -> None:
    # bf16: the int4 CPU kernel runs the lm_head (the machine's best path), teacher-forced as in the kernel test.
    src = build_tiny_model(tmp_path / "src", arch="qwen2", seed=3, tie_word_embeddings=True, lm_head_std=0.3)
    eq = tmp_path / "eq"
    convert(src, eq, ConvertOptions(group_size=64, lm_head=True), progress=False)
    sd = dequantized_state_dict(eq)
    sequences = [p + hf_logprobs(eq, sd, p, [0] * 8)[0] for p in PROMPTS]
    ref = [hf_sequence_logprobs(eq, sd, s) for s in sequences]
    got = vllm_prompt_logprobs(eq, sequences, dtype="bfloat16")
    diff = max(abs(a - b) for r, g in zip(ref, got, strict=True) for a, b in zip(r, g, strict=True))
    assert diff < 0.3, f"bf16 max |dlogprob| {diff:.3f} against the fp32 reference"


def test_vllm_quantization_flag_on_unquantized_model_is_clear(tiny_llama: Path) -> None:
    with pytest.raises(Exception, match=r"not an EasyQuant checkpoint\. Convert it first"):
        vllm_generate(tiny_llama, PROMPTS[:1], quantization="easyquant")


def _broken(src: Path, dst: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


P = "model.layers.1.self_attn.k_proj"


def _drop(t: dict) -> None:
    del t[f"{P}.outlier_values"]


def _bad_indptr(t: dict) -> None:
    t[f"{P}.outlier_indptr"] = t[f"{P}.outlier_indptr"].flip(0).contiguous()


def _bad_index(t: dict) -> None:
    t[f"{P}.outlier_indices"] = torch.full_like(t[f"{P}.outlier_indices"], 10_000)


def _bad_dtype(t: dict) -> None:
    t[f"{P}.scales"] = t[f"{P}.scales"].float()


def _bad_shape(t: dict) -> None:
    t[f"{P}.qweight"] = t[f"{P}.qweight"][:, :-1].contiguous()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop, rf"missing tensor\(s\) \['{P}\.outlier_values'\]"),  # version 3: the CSR is all three or none
        (_bad_indptr, rf"{P}\.outlier_indptr: (must start at 0|not monotone)"),
        (_bad_index, rf"{P}\.outlier_indices: entry 0 = 10000 out of range"),
        (_bad_dtype, rf"{P}\.scales: dtype torch\.float32, expected torch\.uint8"),  # version 3's multipliers
        (_bad_shape, rf"{P}\.qweight: input dim K = 248 is not a multiple of group_size 32"),
    ],
)
def test_vllm_malformed_checkpoint_fails_at_load(llama_eq_g32: Path, tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    bad = _broken(llama_eq_g32, tmp_path / "bad", edit)
    with pytest.raises(Exception, match=message):
        vllm_generate(bad, PROMPTS[:1])


def test_vllm_unknown_format_version_is_clear(llama_eq: Path, tmp_path: Path) -> None:
    bad = _broken(llama_eq, tmp_path / "future", lambda t: None)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="format_version = 99 is not supported"):
        vllm_generate(bad, PROMPTS[:1])


@pytest.fixture(scope="module")
def llama_eq_mixed(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``--bits-per-weight``: modules of one model at different group sizes (config.json's ``group_sizes``)."""
    dst = tmp_path_factory.mktemp("llama-mixed") / "eq"
    convert(tiny_llama, dst, ConvertOptions(bits_per_weight=4.4), progress=False)
    return dst


def test_vllm_group_size_per_module_matches_hf_reference(llama_eq_mixed: Path) -> None:
    cfg = read_quantization_config(llama_eq_mixed)
    with open_checkpoint(llama_eq_mixed) as ckpt:
        sizes = {cfg.group_size_of(prefix) for prefix, _ in quantized_layers(ckpt, cfg) if not is_vocab_module(prefix)}
    assert len(sizes) > 1  # a mixed checkpoint, or this test would prove nothing
    _check_against_hf(llama_eq_mixed, "easyquant", atol=1e-4)


def test_vllm_fused_shards_at_different_group_sizes_run_apart(tiny_llama: Path, llama_eq_mixed: Path,
                                                              tmp_path: Path) -> None:  # fmt: skip
    """A fused layer whose shards differ in group size (a checkpoint from another writer, or a family of fused
    layers our converter does not know): the loader runs them as separate GEMMs, as it does for column scales."""
    q = "model.layers.0.self_attn.q_proj"
    cfg = json.loads((llama_eq_mixed / "config.json").read_text())
    sizes = cfg["quantization_config"].setdefault("group_sizes", {})
    g = 128 if sizes.get(q, 32) != 128 else 64  # q no longer shares k's and v's group size
    sizes[q] = g
    w = load_file(str(tiny_llama / "model.safetensors"))[f"{q}.weight"]
    qw = quantize_group([w], QuantSpec.for_version(3, group_size=g))[0]

    def requantize(t: dict) -> None:
        for name in [n for n in t if n.startswith(q + ".")]:
            del t[name]
        t.update(layer_tensors(q, qw, cfg["quantization_config"].get("group_meta_bits", 8)))

    bad = _broken(llama_eq_mixed, tmp_path / "mixed", requantize)
    (bad / "config.json").write_text(json.dumps(cfg))
    assert read_quantization_config(bad).group_size_of(q) == g
    _check_against_hf(bad, "easyquant", atol=1e-4)
