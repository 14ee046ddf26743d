"""The checkpoint schema: config parsing and the layer validator's error messages."""

from __future__ import annotations

import pytest
import torch

from easyquant_vllm.format import (
    CheckpointError,
    EasyQuantCheckpointConfig,
    layer_tensors,
    quantized_weight_from_tensors,
    validate_layer,
)
from easyquant_vllm.quant import QuantSpec, dequantize, quantize_weight
from tests.conftest import heavy_tailed

P = "model.layers.0.mlp.down_proj"


@pytest.fixture
def layer() -> dict[str, torch.Tensor]:
    return layer_tensors(P, quantize_weight(heavy_tailed(16, 128, seed=1), QuantSpec(group_size=64)))


def test_layer_tensors_roundtrip(layer: dict[str, torch.Tensor]) -> None:
    qw = quantized_weight_from_tensors(P, layer, bits=4, group_size=64)
    assert qw.shape == (16, 128)
    assert list(layer) == [
        f"{P}.{s}" for s in ("qweight", "scales", "outlier_indptr", "outlier_indices", "outlier_values")
    ]
    ref = dequantize(*(layer[f"{P}.{s}"] for s in ("qweight", "scales", "outlier_indptr", "outlier_indices",
                                                   "outlier_values")), bits=4, group_size=64)  # fmt: skip
    assert torch.equal(qw.dequantize(), ref)


def _corrupt(layer: dict[str, torch.Tensor], suffix: str, value: torch.Tensor | None) -> dict[str, torch.Tensor]:
    out = dict(layer)
    if value is None:
        del out[f"{P}.{suffix}"]
    else:
        out[f"{P}.{suffix}"] = value
    return out


@pytest.mark.parametrize(
    ("suffix", "make", "message"),
    [
        ("scales", lambda t: None, "missing tensor"),
        ("qweight", lambda t: t.to(torch.int64), "dtype torch.int64, expected torch.int32"),
        ("scales", lambda t: t[:, :1], r"shape \[16, 1\], expected \[16, 2\]"),
        ("outlier_indptr", lambda t: t.flip(0), "must start at 0|not monotone"),
        ("outlier_indptr", lambda t: torch.cat([t[:-1], t[-1:] + 1]), "ends at"),
        ("outlier_indices", lambda t: t.clone().fill_(999), "out of range"),
        ("outlier_values", lambda t: t[:-1], "values but"),
        ("scales", lambda t: t.clone().fill_(float("nan")), "NaN or Inf"),
    ],
)
def test_validate_layer_names_tensor_and_problem(layer, suffix, make, message) -> None:  # type: ignore[no-untyped-def]
    bad = _corrupt(layer, suffix, make(layer[f"{P}.{suffix}"]))
    with pytest.raises(CheckpointError, match=message) as e:
        validate_layer(P, bad, bits=4, group_size=64)
    assert P in str(e.value)


def test_validate_layer_requires_ascending_columns(layer: dict[str, torch.Tensor]) -> None:
    indptr = layer[f"{P}.outlier_indptr"]
    row = int(torch.nonzero(indptr[1:] - indptr[:-1] >= 2)[0])  # a row with two outliers
    idx = layer[f"{P}.outlier_indices"].clone()
    a = int(indptr[row])
    idx[a], idx[a + 1] = idx[a + 1].clone(), idx[a].clone()
    with pytest.raises(CheckpointError, match="not strictly ascending"):
        validate_layer(P, _corrupt(layer, "outlier_indices", idx), bits=4, group_size=64)


def test_config_roundtrip_and_errors() -> None:
    cfg = EasyQuantCheckpointConfig(bits=4, group_size=64, modules_to_not_convert=["lm_head"])
    d = cfg.to_dict()
    assert d["quant_method"] == "easyquant" and d["format_version"] == 1
    assert EasyQuantCheckpointConfig.from_dict(d) == cfg
    with pytest.raises(CheckpointError, match="format_version 2 is not supported"):
        EasyQuantCheckpointConfig.from_dict({**d, "format_version": 2})
    with pytest.raises(CheckpointError, match="unsupported bits = 3"):
        EasyQuantCheckpointConfig.from_dict({**d, "bits": 3})
    with pytest.raises(CheckpointError, match="unsupported group_size = 100"):
        EasyQuantCheckpointConfig.from_dict({**d, "group_size": 100})
