"""The checkpoint schema: config parsing and the layer validator's error messages."""

from __future__ import annotations

import pytest
import torch

from easyquant_vllm.format import (
    TENSOR_SUFFIXES,
    CheckpointError,
    EasyQuantCheckpointConfig,
    bits_per_weight,
    layer_tensors,
    quantized_weight_from_tensors,
    validate_layer,
)
from easyquant_vllm.quant import (
    DEFAULT_FORMAT_VERSION,
    QuantSpec,
    dequantize,
    pack_zeros,
    quantize_group,
    quantize_weight,
    unpack_codes,
    unpack_zeros,
)
from tests.conftest import heavy_tailed

P = "model.layers.0.mlp.down_proj"


@pytest.fixture
def layer() -> dict[str, torch.Tensor]:
    return layer_tensors(P, quantize_weight(heavy_tailed(16, 128, seed=1), QuantSpec.for_version(1, group_size=64)))


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
    assert d["quant_method"] == "easyquant" and d["format_version"] == DEFAULT_FORMAT_VERSION
    assert EasyQuantCheckpointConfig.from_dict(d) == cfg
    v1 = {**d, "format_version": 1, "zero_points": False, "column_scale": False}
    v1.pop("group_meta_bits", None)  # version 3's key (6-bit steps and zeros by default)
    assert EasyQuantCheckpointConfig.from_dict(v1).format_version == 1  # v1 still loads
    assert EasyQuantCheckpointConfig.from_dict({**d, "format_version": 3}).format_version == 3
    with pytest.raises(CheckpointError, match=r"format_version = 4 is not supported"):
        EasyQuantCheckpointConfig.from_dict({**d, "format_version": 4})
    with pytest.raises(CheckpointError, match="zero_points needs format_version 2, the checkpoint says 1"):
        EasyQuantCheckpointConfig.from_dict({**v1, "zero_points": True})
    with pytest.raises(CheckpointError, match="column_scale must be true or false, got 'yes'"):
        EasyQuantCheckpointConfig.from_dict({**d, "column_scale": "yes"})
    with pytest.raises(CheckpointError, match=r"bits = 3 is not supported \(supported: \[4, 8\]\)"):
        EasyQuantCheckpointConfig.from_dict({**d, "bits": 3})
    with pytest.raises(CheckpointError, match="group_size = 100 is not supported"):
        EasyQuantCheckpointConfig.from_dict({**d, "group_size": 100})
    assert not EasyQuantCheckpointConfig.from_dict(d).lm_head  # absent: the output projection stays unquantized
    assert EasyQuantCheckpointConfig.from_dict({**d, "lm_head": True}).lm_head
    with pytest.raises(CheckpointError, match="lm_head must be true or false, got 1"):
        EasyQuantCheckpointConfig.from_dict({**d, "lm_head": 1})


def test_config_lm_head_bits() -> None:
    # The vocabulary matrix's own code width: absent means the checkpoint's bits (checkpoints before the key);
    # written whenever lm_head is true, never without it.
    d = EasyQuantCheckpointConfig(bits=4, group_size=32).to_dict()
    assert "lm_head_bits" not in d
    old = EasyQuantCheckpointConfig.from_dict({**d, "lm_head": True})
    assert old.lm_head_bits is None and old.vocab_bits == 4 and old.bits_of("model.embed_tokens") == 4
    cfg = EasyQuantCheckpointConfig.from_dict({**d, "lm_head": True, "lm_head_bits": 8})
    assert cfg.vocab_bits == 8 and EasyQuantCheckpointConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.bits_of("lm_head") == cfg.bits_of("model.language_model.embed_tokens") == 8
    assert cfg.bits_of("model.layers.0.mlp.down_proj") == cfg.bits_of("model.layers.0.self_attn.q_proj") == 4
    spec = QuantSpec.for_version(3, group_size=32)
    assert EasyQuantCheckpointConfig.from_spec(spec, lm_head=True, lm_head_bits=8).to_dict()["lm_head_bits"] == 8
    assert EasyQuantCheckpointConfig.from_spec(spec, lm_head=True).lm_head_bits == 4  # the linears' bits
    assert EasyQuantCheckpointConfig.from_spec(spec, lm_head=False, lm_head_bits=8).lm_head_bits is None
    with pytest.raises(CheckpointError, match=r"lm_head_bits = 6 is not supported \(supported: \[4, 8\]\)"):
        EasyQuantCheckpointConfig.from_dict({**d, "lm_head": True, "lm_head_bits": 6})
    with pytest.raises(CheckpointError, match="lm_head_bits is set, but lm_head is not true"):
        EasyQuantCheckpointConfig.from_dict({**d, "lm_head_bits": 8})
    with pytest.raises(ValueError, match=r"lm_head_bits = 6; supported: \[4, 8\]"):
        EasyQuantCheckpointConfig(lm_head=True, lm_head_bits=6)


def test_config_defaults_are_the_default_format_versions() -> None:
    # One definition per version (QuantSpec.for_version): the config's defaults, QuantSpec() and the converter's
    # options agree with it.
    from converters.convert import ConvertOptions, resolve_spec
    from easyquant_vllm.quant import DEFAULT_FORMAT_VERSION, FORMAT_DEFAULTS

    for version in FORMAT_DEFAULTS:
        spec = QuantSpec.for_version(version, group_size=64)
        assert resolve_spec(ConvertOptions(format_version=version), 64) == spec
        cfg = EasyQuantCheckpointConfig.from_spec(spec)
        assert (cfg.format_version, cfg.zero_points, cfg.column_scale) == (version, version >= 2, version >= 2)
        assert cfg.max_outlier_fraction == FORMAT_DEFAULTS[version]["max_outlier_fraction"]
        assert EasyQuantCheckpointConfig.from_dict(cfg.to_dict()) == cfg
    default = QuantSpec.for_version(DEFAULT_FORMAT_VERSION)
    assert QuantSpec() == default and ConvertOptions().format_version == DEFAULT_FORMAT_VERSION
    assert EasyQuantCheckpointConfig() == EasyQuantCheckpointConfig.from_spec(default)
    with pytest.raises(ValueError, match=r"zero points and column scales need format version 2.*not 1"):
        QuantSpec.for_version(1, zero_points=True)


# Each malformed field of quantization_config: a CheckpointError naming the file and the key (was: accepted, then a
# bare TypeError, or accepted silently).
BAD_FIELDS = [
    ("bits", 4.0, r"quantization_config\.bits must be an integer, one of \[4, 8\]; got 4\.0 \(float\)"),
    ("group_size", 64.0, r"quantization_config\.group_size must be an integer.*got 64\.0 \(float\)"),
    ("format_version", True, r"quantization_config\.format_version must be an integer.*got True \(bool\)"),
    ("format_version", None, r"quantization_config\.format_version must be an integer.*got nothing \(missing\)"),
    ("bits", "4", r"quantization_config\.bits must be an integer.*got '4' \(str\)"),
    (
        "outlier_threshold",
        "3",
        r"quantization_config\.outlier_threshold must be a finite number "
        r"in \[0, inf\], got '3'",
    ),
    ("outlier_threshold", True, r"quantization_config\.outlier_threshold must be a finite number"),
    ("outlier_threshold", 10**400, r"quantization_config\.outlier_threshold must be a finite"),  # float() overflows
    ("max_outlier_fraction", 2.0, r"quantization_config\.max_outlier_fraction must be a finite number in \[0, 1\]"),
    ("method_params", [1, 2], r"quantization_config\.method_params must be a JSON object, got \[1, 2\]"),
    ("method", 3, r"quantization_config\.method must be a string, got 3"),
    ("modules_to_not_convert", "lm_head", r"quantization_config\.modules_to_not_convert must be a list of strings"),
    ("zero_points", 1, r"quantization_config\.zero_points must be true or false, got 1"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_FIELDS, ids=[f"{k}={v!r:.12}" for k, v, _ in BAD_FIELDS])
def test_config_field_of_wrong_type_names_key_and_file(key: str, value: object, message: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from easyquant_vllm.format import read_quantization_config

    qc = {**EasyQuantCheckpointConfig().to_dict(), key: value}
    if value is None:
        del qc[key]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'config.json'}: " + message):
        read_quantization_config(tmp_path)
    with pytest.raises(CheckpointError, match="^config.json: " + message):
        EasyQuantCheckpointConfig.from_dict(qc)


def test_validate_layer_refuses_an_empty_layer() -> None:
    empty = {f"{P}.qweight": torch.zeros(0, 16, dtype=torch.int32), f"{P}.scales": torch.zeros(0, 2).half(),
             f"{P}.outlier_indptr": torch.zeros(1, dtype=torch.int32),
             f"{P}.outlier_indices": torch.zeros(0, dtype=torch.int32), f"{P}.outlier_values": torch.zeros(0).half(),
             f"{P}.qzeros": torch.zeros(0, 1, dtype=torch.uint8), f"{P}.col_scale": torch.ones(128).half()}  # fmt: skip
    with pytest.raises(CheckpointError, match=r"qweight: shape \[0, 16\] holds an empty \[0, 128\] weight"):
        quantized_weight_from_tensors(P, empty, 4, 64, zero_points=True, column_scale=True)


def _v2_layer(n: int = 32, k: int = 128, group_size: int = 32):  # type: ignore[no-untyped-def]
    w = heavy_tailed(n, k, seed=4) * torch.exp(0.5 * torch.randn(k, generator=torch.Generator().manual_seed(1)))
    return quantize_group([w], QuantSpec.for_version(2, group_size=group_size))[0], w


def test_zero_points_pack_two_per_byte_low_nibble_first() -> None:
    z = torch.tensor([[1, 2, 3], [15, 0, 7]], dtype=torch.uint8)
    packed = pack_zeros(z, 4)
    assert packed.tolist() == [[0x21, 0x03], [0x0F, 0x07]]  # odd group count: the last high nibble is 0
    assert torch.equal(unpack_zeros(packed, 3, 4), z)
    assert torch.equal(unpack_zeros(pack_zeros(z, 8), 3, 8), z)


def test_v2_layer_roundtrip_and_reconstruction() -> None:
    qw, w = _v2_layer()
    assert qw.zeros is not None and qw.col_scale is not None and qw.col_scale.dtype == torch.float16
    tensors = layer_tensors("P", qw)
    assert set(tensors) == {f"P.{s}" for s in (*TENSOR_SUFFIXES, "qzeros", "col_scale")}
    assert tensors["P.qzeros"].shape == (32, 2) and tensors["P.col_scale"].shape == (128,)
    back = quantized_weight_from_tensors("P", tensors, 4, 32, zero_points=True, column_scale=True)
    assert torch.equal(back.dequantize(), qw.dequantize())
    # The semantics of docs/format.md, written out: c[k] * (s * (u - z)) + S.
    u = unpack_codes(qw.qweight, 4).float()
    z = qw.zeros.float().repeat_interleave(32, dim=1)
    s = qw.scales.float().repeat_interleave(32, dim=1)
    manual = qw.col_scale.float() * (s * (u - z)) + qw.outliers.to_dense()
    assert torch.equal(qw.dequantize(), manual)
    assert float((qw.dequantize() - w).norm() / w.norm()) < 0.12


def test_v2_layer_validation_names_the_tensor() -> None:
    qw, _ = _v2_layer()
    t = layer_tensors("P", qw)
    with pytest.raises(CheckpointError, match=r"layer P: missing tensor\(s\) \['P.qzeros'\]"):
        validate_layer("P", {k: v for k, v in t.items() if k != "P.qzeros"}, 4, 32, True, True)
    with pytest.raises(CheckpointError, match=r"tensor\(s\) \['P.col_scale'\] present, but config.json"):
        validate_layer("P", t, 4, 32, True, False)
    with pytest.raises(CheckpointError, match=r"P.qzeros: shape \[32, 3\], expected \[32, 2\]"):
        validate_layer("P", {**t, "P.qzeros": torch.zeros(32, 3, dtype=torch.uint8)}, 4, 32, True, True)
    bad = t["P.col_scale"].clone()
    bad[5] = 0
    with pytest.raises(CheckpointError, match=r"P\.col_scale: column scales must be > 0"):
        validate_layer("P", {**t, "P.col_scale": bad}, 4, 32, True, True)


def test_bits_per_weight_counts_zero_points_and_column_scale() -> None:
    base = bits_per_weight(64, 256, 4, 64, nnz=0)
    assert bits_per_weight(64, 256, 4, 64, 0, zero_points=True) == pytest.approx(base + 4 / 64)
    assert bits_per_weight(64, 256, 4, 64, 0, column_scale=True) == pytest.approx(base + 16 / 64)
