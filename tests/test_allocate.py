"""``--bits-per-weight``: a group size per fused module within a budget (quant/allocate.py), in the converter, the
format (config.json's ``group_sizes``) and the reference."""

from __future__ import annotations

import itertools
import json
import random
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from converters.convert import ConversionError, ConvertOptions, allocation_unit, convert, max_tensor_parallel
from converters.tiny_model import build_tiny_model
from easyquant_vllm.format import CheckpointError, EasyQuantCheckpointConfig, validate_checkpoint
from easyquant_vllm.quant import QuantSpec, quantize_group
from easyquant_vllm.quant.allocate import Candidate, allocate, total_bits
from easyquant_vllm.reference import dequantized_state_dict
from tests.test_format_v3 import gguf_like

# --- the knapsack --------------------------------------------------------------------------------------------------


def test_allocation_unit_is_the_fused_gemm_or_the_joint_column_scale() -> None:
    # w1 / w3 share a column scale and are quantized together: one layout for both (InternLM2-style dense models).
    assert allocation_unit("model.layers.0.feed_forward.w1.weight") == "model.layers.0.feed_forward.w1+w3"
    assert allocation_unit("model.layers.0.feed_forward.w3.weight") == "model.layers.0.feed_forward.w1+w3"
    qkv = "model.layers.3.self_attn.q_proj+k_proj+v_proj"
    assert {allocation_unit(f"model.layers.3.self_attn.{m}_proj.weight") for m in "qkv"} == {qkv}
    assert allocation_unit("model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.gate_proj+up_proj"
    shared, mla = "mlp.shared_expert.up_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"
    assert allocation_unit(f"model.layers.3.{shared}").endswith("shared_expert.gate_proj+up_proj")
    assert allocation_unit(f"model.layers.3.{mla}").endswith("q_a_proj+kv_a_proj_with_mqa")
    assert allocation_unit("model.layers.3.mlp.down_proj.weight") == "model.layers.3.mlp.down_proj"
    assert allocation_unit("model.layers.3.self_attn.qkv_proj.weight") == "model.layers.3.self_attn.qkv_proj"


def _random_costs(rng: random.Random, units: int, options: int) -> dict[str, list[Candidate]]:
    """Candidates as real layouts behave: more bits, less error, at diminishing returns; sizes differ per unit."""
    costs = {}
    for u in range(units):
        size, err = rng.uniform(1, 10), rng.uniform(0.5, 2)
        bits = sorted(rng.uniform(4.1, 4.6) for _ in range(options))
        costs[f"u{u}"] = [Candidate(b * size, err * size * 2 ** (-8 * (b - 4.1))) for b in bits]
    return costs


@pytest.mark.parametrize("seed", range(6))
def test_allocate_fits_the_budget_and_beats_every_uniform_layout(seed: int) -> None:
    rng = random.Random(seed)
    costs = _random_costs(rng, units=12, options=4)
    lo, hi = (sum(c[i].bits for c in costs.values()) for i in (0, -1))
    budget = rng.uniform(lo, hi)
    choice = allocate(costs, budget)
    used = total_bits(costs, choice)
    error = sum(costs[u][i].error for u, i in choice.items())
    assert used <= budget
    for i in range(4):  # one layout for every unit, where it fits
        if sum(c[i].bits for c in costs.values()) <= budget:
            assert error <= sum(c[i].error for c in costs.values()) + 1e-12
    for u, i in choice.items():  # no single upgrade that fits is left
        for c in costs[u]:
            assert not (c.error < costs[u][i].error and used - costs[u][i].bits + c.bits <= budget)


def test_allocate_matches_brute_force_on_a_small_case() -> None:
    rng = random.Random(7)
    costs = _random_costs(rng, units=4, options=3)
    budget = sum(c[1].bits for c in costs.values())
    best = min(
        (sum(costs[u][i].error for u, i in zip(costs, pick, strict=True)), pick)
        for pick in itertools.product(range(3), repeat=4)
        if sum(costs[u][i].bits for u, i in zip(costs, pick, strict=True)) <= budget
    )
    choice = allocate(costs, budget)
    assert sum(costs[u][i].error for u, i in choice.items()) <= best[0] * 1.02  # Lagrange + greedy: near optimal


def test_allocate_past_the_smallest_layout_returns_it_and_skips_impossible_ones() -> None:
    costs = {"a": [Candidate(10, 1.0), Candidate(8, 2.0)], "b": [Candidate(float("inf"), float("inf")),
                                                               Candidate(5, 1.0)]}  # fmt: skip
    assert allocate(costs, 1.0) == {"a": 1, "b": 1}
    assert allocate(costs, 15.0) == {"a": 0, "b": 1}


# --- the converter -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with layer 0's gate/up on a 4-bit grid per block of 32 (as a GGUF's Q4_1 dequantizes): groups
    of 32 recover it almost exactly, every other layer is Gaussian."""
    src = build_tiny_model(tmp_path_factory.mktemp("grid") / "src")
    path = src / "model.safetensors"
    sd = load_file(path)
    for i, name in enumerate(("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight")):
        sd[name] = gguf_like(*sd[name].shape, seed=i)
    save_file(sd, path, metadata={"format": "pt"})
    return src


def _convert(src: Path, dst: Path, budget: float, meta_bits: int | None = None) -> dict:  # type: ignore[type-arg]
    return convert(src, dst, ConvertOptions(bits_per_weight=budget, group_meta_bits=meta_bits), progress=False)


def _weighted_error(report: dict) -> float:  # type: ignore[type-arg]
    """The allocation's objective over a checkpoint: relative squared error times weights, summed."""
    return sum(r["rel_err"] ** 2 * r["shape"][0] * r["shape"][1] for r in report["tensors"] if "layers" in r["name"])


def test_bits_per_weight_spends_the_budget_where_it_removes_most_error(grid_llama: Path, tmp_path: Path) -> None:
    # One-byte steps and zeros: then groups of 32 everywhere do not fit the bits of groups of 64 everywhere, and
    # both budgets below must mix (with 6-bit ones, groups of 32 fit g64's 8-bit budget on this model).
    uniform = convert(grid_llama, tmp_path / "g64", ConvertOptions(group_size=64, group_meta_bits=8), progress=False)
    at_g64 = uniform["totals"]["bits_per_weight_linears"]  # the budget of "large": groups of 64 everywhere
    small, large = _convert(grid_llama, tmp_path / "small", 4.3, 8), _convert(grid_llama, tmp_path / "large", at_g64, 8)
    for dst, report, budget in ((tmp_path / "small", small, 4.3), (tmp_path / "large", large, at_g64)):
        assert report["totals"]["bits_per_weight_linears"] <= budget  # the tiny model's rows are all measured
        qc = json.loads((dst / "config.json").read_text())["quantization_config"]
        cfg = EasyQuantCheckpointConfig.from_dict(qc)
        assert cfg.group_size == 32 and cfg.group_sizes  # a mixed checkpoint: some modules differ
        for layer in (0, 1):  # the shards of one GEMM share one group size
            p = f"model.layers.{layer}"
            assert len({cfg.group_size_of(f"{p}.self_attn.{m}_proj") for m in "qkv"}) == 1
            assert cfg.group_size_of(f"{p}.mlp.gate_proj") == cfg.group_size_of(f"{p}.mlp.up_proj")
        assert all(r["group_size"] == cfg.group_size_of(r["name"]) for r in report["tensors"] if "layers" in r["name"])
        assert validate_checkpoint(dst)["layers"] == len(report["tensors"])
    # Within the same bits as groups of 64 everywhere, less error than that; more bits, less error.
    assert _weighted_error(large) < _weighted_error(uniform)
    assert _weighted_error(large) < _weighted_error(small)


def test_bits_per_weight_checkpoint_is_what_each_layer_spec_gives(grid_llama: Path, tmp_path: Path) -> None:
    """The reference reads every layer at its own group size, and W' is the quantizer's for that layout."""
    dst = tmp_path / "eq"
    _convert(grid_llama, dst, 4.3)
    cfg = EasyQuantCheckpointConfig.from_dict(json.loads((dst / "config.json").read_text())["quantization_config"])
    module = next(m for m in cfg.group_sizes if m.endswith(("o_proj", "down_proj")))  # quantized on its own
    w = load_file(grid_llama / "model.safetensors")[f"{module}.weight"]
    report = {r["name"]: r for r in json.loads((dst / "easyquant_report.json").read_text())["tensors"]}
    spec = QuantSpec.for_version(3, group_size=cfg.group_sizes[module], meta_bits=cfg.group_meta_bits)
    if report[module]["outlier_fraction"] == 0:
        spec = replace(spec, max_outlier_fraction=0.0)
    expected = quantize_group([w], spec)[0].dequantize()
    torch.testing.assert_close(dequantized_state_dict(dst)[f"{module}.weight"], expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (ConvertOptions(bits_per_weight=4.4, format_version=2), "needs --format-version 3"),
        (ConvertOptions(bits_per_weight=4.4, group_size=64), "leave out --group-size 64"),
        (ConvertOptions(bits_per_weight=8.5, bits=8), "leave out --bits 8"),
        (ConvertOptions(bits_per_weight=4.0), "more than the 4 bits"),
        (ConvertOptions(bits_per_weight=float("nan")), "more than the 4 bits"),
        (ConvertOptions(bits_per_weight=4.05), r"smallest layouts .* store 4\.\d+ bits per weight"),
    ],
)
def test_bits_per_weight_bad_options_are_clear(tiny_llama: Path, tmp_path: Path, opts: ConvertOptions,
                                                message: str) -> None:  # fmt: skip
    with pytest.raises(ConversionError, match=message):
        convert(tiny_llama, tmp_path / "eq", opts, progress=False)
    assert not (tmp_path / "eq").exists()


def test_default_keeps_every_layer_servable_at_the_largest_tensor_parallel_size(tiny_llama: Path,
                                                                               tmp_path: Path) -> None:  # fmt: skip
    # A layer tensor parallelism may split by K (o_proj, down_proj) takes groups of 64 under the default only where
    # K / TP stays a multiple of 64 at the largest TP the heads allow (a power of two, at most 8).
    assert max_tensor_parallel({"num_attention_heads": 12}) == 4 and max_tensor_parallel({}) == 8
    assert max_tensor_parallel({"text_config": {"num_attention_heads": 9}}) == 1
    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    config = json.loads((src / "config.json").read_text())
    for heads in (1, 8):  # TP 1: anything; TP 8: o_proj's K = 256 and down_proj's 512 need K % 512
        (src / "config.json").write_text(json.dumps({**config, "num_attention_heads": heads}))
        convert(src, tmp_path / f"h{heads}", progress=False)
        qc = json.loads((tmp_path / f"h{heads}" / "config.json").read_text())["quantization_config"]
        sizes = qc.get("group_sizes", {})
        if heads == 8:
            assert not any(m.endswith("o_proj") for m in sizes), sizes
        else:
            assert any(m.endswith(("o_proj", "down_proj")) for m in sizes), sizes  # the constraint was binding


def test_default_budget_is_version_2s_size(tiny_llama: Path, tmp_path: Path) -> None:
    """``--bits-per-weight auto`` (the default): no more bits than format version 2's defaults store for the same
    model, less error than version 2, and only groups of 32 and 64 (no K / TP constraint of groups of 128)."""
    auto = convert(tiny_llama, tmp_path / "auto", progress=False)["totals"]
    v2 = convert(tiny_llama, tmp_path / "v2", ConvertOptions(format_version=2), progress=False)["totals"]
    off = convert(tiny_llama, tmp_path / "off", ConvertOptions(bits_per_weight=None), progress=False)["totals"]
    # The budget is version 2's bits estimated on a sample of rows (every 4th here): close to what it writes.
    assert auto["layout_budget"] == pytest.approx(v2["bits_per_weight_linears"], abs=0.01)
    assert auto["bits_per_weight_linears"] <= auto["layout_budget"] + 1e-9
    assert auto["bits_per_weight_linears"] <= v2["bits_per_weight_linears"] + 0.01
    assert off["bits_per_weight_linears"] > v2["bits_per_weight_linears"] + 0.1  # groups of 32 everywhere: larger
    assert off["rel_err"] < auto["rel_err"] < v2["rel_err"]
    cfg = EasyQuantCheckpointConfig.from_dict(
        json.loads((tmp_path / "auto" / "config.json").read_text())["quantization_config"]
    )
    assert cfg.group_size == 32 and set(cfg.group_sizes.values()) == {64}  # mixed, never 128
    assert off["layout_budget"] is None and off["layout_seconds"] == 0
    assert validate_checkpoint(tmp_path / "auto")["layers"] == 15


def test_default_budget_below_the_smallest_layouts_takes_them(tiny_llama: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    # A version-2 size below what version 3 can store (here: a reference with no outliers and no column scale, 4.27
    # bits, under the 4.30 of groups of 64 with their row units and column scales): the default converts with the
    # smallest layouts and says so, where an explicit number would be refused.
    import converters.convert as conv

    monkeypatch.setattr(conv, "version2_spec", lambda dims: QuantSpec.for_version(
        2, group_size=128, max_outlier_fraction=0.0, normalize="none"))  # fmt: skip
    with caplog.at_level("WARNING", logger="easyquant.convert"):
        totals = convert(tiny_llama, tmp_path / "eq", progress=False)["totals"]
    assert "--bits-per-weight auto: version 2's size (4.2" in caplog.text and "they are taken" in caplog.text
    assert totals["layout_budget"] < totals["bits_per_weight_linears"]
    qc = json.loads((tmp_path / "eq" / "config.json").read_text())["quantization_config"]
    assert set(qc["group_sizes"].values()) == {64}  # groups of 64 everywhere
    assert validate_checkpoint(tmp_path / "eq")["layers"] == 15


@pytest.mark.parametrize(
    "opts",
    [ConvertOptions(group_size=32), ConvertOptions(group_size=64), ConvertOptions(format_version=2),
     ConvertOptions(bits=8), ConvertOptions(format_version=1)],
)  # fmt: skip
def test_default_budget_steps_aside_for_an_explicit_layout(tiny_llama: Path, tmp_path: Path,
                                                           opts: ConvertOptions) -> None:  # fmt: skip
    # auto is the default, not a request: an explicit group size, code width or older version is the layout given.
    report = convert(tiny_llama, tmp_path / "eq", opts, progress=False)
    assert report["totals"]["layout_budget"] is None
    qc = json.loads((tmp_path / "eq" / "config.json").read_text())["quantization_config"]
    assert "group_sizes" not in qc and all(r["group_size"] == qc["group_size"] for r in report["tensors"])


def test_cli_bits_per_weight_values(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from converters.cli import main as cli_main

    assert cli_main([str(tiny_llama), str(tmp_path / "off"), "--bits-per-weight", "off", "--no-progress"]) == 0
    assert "format v3, 4-bit, group 32, zero points" in capsys.readouterr().out
    assert cli_main([str(tiny_llama), str(tmp_path / "n"), "--bits-per-weight", "4.3", "--no-progress"]) == 0
    assert "groups 32 (" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main([str(tiny_llama), str(tmp_path / "bad"), "--bits-per-weight", "small", "--no-progress"])
    assert "auto or off, not 'small'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# --- the format ----------------------------------------------------------------------------------------------------


def test_group_sizes_roundtrip_and_old_checkpoints_read_unchanged() -> None:
    base = EasyQuantCheckpointConfig().to_dict()
    assert "group_sizes" not in base  # one group size: the config reads as before the key
    cfg = EasyQuantCheckpointConfig.from_dict({**base, "group_sizes": {"model.layers.0.mlp.down_proj": 128}})
    assert cfg.group_size_of("model.layers.0.mlp.down_proj") == 128
    assert cfg.group_size_of("model.layers.0.mlp.up_proj") == cfg.group_size
    assert EasyQuantCheckpointConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"group_sizes": [64]}, "group_sizes.* must be a JSON object"),
        ({"group_sizes": {"m": 48}}, "gives m the group size 48"),
        ({"group_sizes": {"m": -1}}, "gives m the group size -1"),
        ({"group_sizes": {"m": "64"}}, "gives m the group size '64'"),
        ({"group_sizes": {"m": 64}, "format_version": 2, "zero_points": True}, "needs format_version 3"),
    ],
)
def test_group_sizes_bad_values_name_the_key(edit: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(CheckpointError, match=message):
        EasyQuantCheckpointConfig.from_dict({**EasyQuantCheckpointConfig().to_dict(), **edit}, "x/config.json")


def _edit_config(dst: Path, **changes: object) -> None:
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"].update(changes)
    (dst / "config.json").write_text(json.dumps(config))


def test_validate_names_a_stray_or_wrong_group_size(grid_llama: Path, tmp_path: Path) -> None:
    dst = tmp_path / "eq"
    _convert(grid_llama, dst, 4.4)
    sizes = json.loads((dst / "config.json").read_text())["quantization_config"]["group_sizes"]
    _edit_config(dst, group_sizes={**sizes, "model.layers.9.mlp.down_proj": 64})
    with pytest.raises(CheckpointError, match=r"model\.layers\.9\.mlp\.down_proj, which is no quantized layer"):
        validate_checkpoint(dst)
    module = next(iter(sizes))
    _edit_config(dst, group_sizes={m: g for m, g in sizes.items() if m != module})  # read at the default 32
    with pytest.raises(CheckpointError, match=re.escape(module)):
        validate_checkpoint(dst)
