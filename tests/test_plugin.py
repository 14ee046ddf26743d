"""The vLLM plugin registration: entry point, idempotent register(), config parsing errors."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

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
