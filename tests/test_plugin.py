"""The vLLM plugin registration: entry point, idempotent register(), config parsing errors."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch

from easyquant_vllm.format import EasyQuantCheckpointConfig


@pytest.fixture(scope="module", autouse=True)
def _vllm() -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup.sh installs the CPU build)")


def test_entry_point_declared_and_register_idempotent() -> None:
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "easyquant"]
    assert [ep.value for ep in eps] == ["easyquant_vllm:register"]
    register = eps[0].load()
    register()
    register()  # vLLM calls it in every process, possibly more than once
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from easyquant_vllm.vllm_config import EasyQuantConfig

    assert QUANTIZATION_METHODS.count("easyquant") == 1
    assert get_quantization_config("easyquant") is EasyQuantConfig


def test_from_config_validates() -> None:
    from easyquant_vllm.vllm_config import EasyQuantConfig

    good = EasyQuantCheckpointConfig(bits=4, group_size=64, modules_to_not_convert=["lm_head"]).to_dict()
    cfg = EasyQuantConfig.from_config(good)
    assert cfg.checkpoint.group_size == 64 and cfg.get_name() == "easyquant"
    with pytest.raises(ValueError, match="format_version = 7 is not supported"):
        EasyQuantConfig.from_config({**good, "format_version": 7})
    with pytest.raises(ValueError, match=r"config\.json: quantization_config\.group_size = 48 is not supported"):
        EasyQuantConfig.from_config({**good, "group_size": 48})
    with pytest.raises(ValueError, match="not an EasyQuant checkpoint"):
        EasyQuantConfig()


def test_fused_layer_skip_must_be_all_or_nothing() -> None:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from easyquant_vllm.vllm_config import EasyQuantConfig

    def config(skip: list[str]) -> EasyQuantConfig:
        cfg = EasyQuantConfig.from_config(EasyQuantCheckpointConfig(modules_to_not_convert=skip).to_dict())
        cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
        return cfg

    from vllm.model_executor.layers.linear import LinearBase

    layer = LinearBase.__new__(LinearBase)  # get_quant_method only looks at its type
    p = "model.layers.0.self_attn"
    all_skipped = config([f"{p}.q_proj", f"{p}.k_proj", f"{p}.v_proj"])
    assert isinstance(all_skipped.get_quant_method(layer, f"{p}.qkv_proj"), UnquantizedLinearMethod)
    with pytest.raises(ValueError, match="only some are quantized"):
        config([f"{p}.k_proj"]).get_quant_method(layer, f"{p}.qkv_proj")


def test_cpu_engine_tunes_malloc_before_building_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # glibc's thresholds must be set before the model's tensors are allocated (cpu_native.tune_malloc), so the first
    # get_quant_method of a CPU engine sets them; EASYQUANT_MALLOC_TUNING=0 or the user's own thresholds leave them.
    import os
    import platform

    from vllm.model_executor.layers.linear import LinearBase
    from vllm.platforms import current_platform

    from easyquant_vllm import vllm_config
    from easyquant_vllm.kernels import cpu_native

    calls: list[int] = []
    monkeypatch.setattr(cpu_native, "tune_malloc", lambda: calls.append(1))
    cfg = vllm_config.EasyQuantConfig.from_config(EasyQuantCheckpointConfig().to_dict())
    cfg.get_quant_method(LinearBase.__new__(LinearBase), "model.layers.0.mlp.down_proj")
    assert calls == ([1] if current_platform.is_cpu() else [])
    monkeypatch.undo()
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    for env, value in ((cpu_native.ENV_MALLOC, "0"), ("MALLOC_TRIM_THRESHOLD_", "1048576"),
                       ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1048576")):  # fmt: skip
        cpu_native.tune_malloc.cache_clear()
        with monkeypatch.context() as m:
            m.setenv(env, value)
            assert cpu_native.tune_malloc() is False, env
    cpu_native.tune_malloc.cache_clear()
    assert cpu_native.tune_malloc() is (platform.libc_ver()[0] == "glibc" and not os.environ.get("LD_PRELOAD"))


def test_loader_accepts_shard_id_as_argument_or_attribute() -> None:
    import torch

    from easyquant_vllm.linear_method import LayerState, ShardPlan, _Loader

    shards = [ShardPlan(f"m.{s}_proj", 8, 8, 0) for s in "qkv"]
    state = LayerState(prefix="m.qkv_proj", shards=shards, k_full=64, k_part=64, col_start=0,
                       act_dtype=torch.float32)  # fmt: skip
    loader = _Loader(state, "scales")
    loader(None, torch.ones(8, 1), "k")  # merged layers pass it as the third argument
    tagged = torch.full((8, 1), 2.0)
    tagged.shard_id = "v"  # some models attach it to the tensor instead
    loader(None, tagged)
    assert set(state.pending) == {1, 2}
    assert float(state.pending[2]["scales"][0, 0]) == 2.0
    with pytest.raises(ValueError, match="unknown shard id 'x'"):
        loader(None, torch.ones(1), "x")


def test_vocab_lookups_on_the_dense_fallback_read_its_matrix(caplog: pytest.LogCaptureFixture) -> None:
    # The converter's default 8-bit lm_head has no CUDA kernel: there the matrix is served dequantized
    # (torch-reference). A tied model's input lookups then take rows of that W' (no second, canonical copy), and the
    # choice is announced as information, not as the fallback warning. The run below is what the method installs on
    # a CUDA device; the lookups need none (the buffer is W' in the model's dtype).
    import logging

    from easyquant_vllm.kernels import FALLBACK, LayerSpec
    from easyquant_vllm.linear_method import KernelRun, LayerState
    from easyquant_vllm.vllm_config import EasyQuantConfig
    from easyquant_vllm.vocab_method import EasyQuantVocabMethod
    from tests.conftest import heavy_tailed, quantized

    ckpt = EasyQuantCheckpointConfig(
        bits=4, group_size=32, lm_head=True, lm_head_bits=8, format_version=3, zero_points=True, column_scale=True
    )
    cfg = EasyQuantConfig.from_config(ckpt.to_dict())
    method = EasyQuantVocabMethod(cfg, "model.embed_tokens", lookup=True)
    qw = quantized(heavy_tailed(96, 64, seed=11), 3, 32, bits=8)
    layer = torch.nn.Module()
    spec = LayerSpec.of(qw, torch.bfloat16, "cuda")
    run = KernelRun(FALLBACK(spec, torch.device("cpu")), ("weight_dequant",), 0, 96, "eq_")
    layer.easyquant = LayerState("model.embed_tokens", [], 64, 64, 0, torch.bfloat16, "cuda", runs=[run])
    layer.register_buffer("eq_weight_dequant", qw.dequantize(torch.bfloat16), persistent=False)
    method._register_lookup(layer, qw, torch.device("cpu"))
    assert layer.lookup_names == [] and not any(n.startswith("lookup_") for n, _ in layer.named_buffers())
    ids = torch.tensor([0, 95, 7, 7])
    assert torch.equal(method.embedding(layer, ids), qw.dequantize(torch.bfloat16)[ids])
    with caplog.at_level(logging.INFO, logger="vllm.easyquant"):
        method._announce(FALLBACK, ["cuda-int4: needs 4-bit codes"], spec, "model.embed_tokens")
    ours = [r.levelno for r in caplog.records if r.name == "vllm.easyquant"]
    assert ours == [logging.INFO], caplog.records
    assert "8-bit vocabulary matrix model.embed_tokens is served dequantized" in caplog.text
