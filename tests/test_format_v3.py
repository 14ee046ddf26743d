"""Format version 3 (compact steps): the quantizer, the schema, tensor-parallel slices and the reference."""

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
    QuantSpec,
    dequantize_rows,
    max_row_nnz,
    meta6_bytes,
    pack_meta6,
    quantize_group,
    unpack_codes,
    unpack_meta6,
)
from easyquant_vllm.quant.solvers import affine_loss, rtn_asym, solve_affine
from easyquant_vllm.sharding import pad_rows, slice_columns, slice_rows, stack_rows
from tests.conftest import heavy_tailed


def _v3(w: torch.Tensor, group_size: int = 32, **overrides: object):  # type: ignore[no-untyped-def]
    return quantize_group([w], QuantSpec.for_version(3, group_size=group_size, **overrides))[0]


def gguf_like(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """``[n, k]`` weights on a 16-level grid per block of 32, as a Q4_1 GGUF dequantizes: ``d * q + m`` with a
    float16 step ``d`` and offset ``m`` per block (the published SmolLM2 weights are of this kind)."""
    g = torch.Generator().manual_seed(seed)
    blocks = n * k // 32
    d = (0.002 + 0.01 * torch.rand(blocks, 1, generator=g)).half().float()
    m = (-d * (4 + 8 * torch.rand(blocks, 1, generator=g))).half().float()
    q = torch.randint(0, 16, (blocks, 32), generator=g).float()
    q[:, 0], q[:, 1] = 0, 15  # every block spans its grid, as a min-max quantizer leaves it
    return (d * q + m).reshape(n, k)


def test_v3_reconstruction_is_the_documented_formula() -> None:
    w = heavy_tailed(32, 128, seed=1)
    w[3, 5] = 0.9  # an outlier
    qw = _v3(w, normalize="sinkhorn")
    assert qw.format_version == 3 and qw.scales.dtype == torch.uint8 and qw.row_steps is not None
    assert qw.outliers.nnz > 0
    u = unpack_codes(qw.qweight, 4).float()
    s = (qw.row_steps.float()[:, None] * qw.scales.float()).repeat_interleave(32, dim=1)
    z = (qw.zeros.float() / 16).repeat_interleave(32, dim=1)
    manual = qw.col_scale.float() * (s * (u - z)) + qw.outliers.to_dense()
    assert torch.equal(qw.dequantize(), manual)
    # The outlier's value is what the dense part misses: W' equals W there up to its float16 rounding.
    assert abs(float(qw.dequantize()[3, 5]) - 0.9) < 1e-3
    assert float((qw.dequantize() - w).norm() / w.norm()) < 0.08


def test_v3_recovers_a_gguf_grid_of_blocks_of_32() -> None:
    # With one byte each for the step multiplier and the zero: the 6-bit default keeps a coarser grid of steps
    # (a 64th of the row's largest) and zeros (quarter codes), and lands near such a grid, not on it.
    w = gguf_like(64, 256, seed=2)
    qw = _v3(w, normalize="none", max_outlier_fraction=0.0, meta_bits=8)
    v2 = quantize_group([w], QuantSpec.for_version(2, group_size=32, normalize="none", max_outlier_fraction=0.0))[0]
    err3 = float((qw.dequantize() - w).norm() / w.norm())
    err2 = float((v2.dequantize() - w).norm() / w.norm())
    assert err3 < 0.1 * err2, (err3, err2)  # the fractional zero and fitted step find the grid; v2's cannot
    err6 = float((_v3(w, normalize="none", max_outlier_fraction=0.0).dequantize() - w).norm() / w.norm())
    assert err3 < err6 < 0.5 * err2, (err3, err6, err2)


def test_solve_affine_fits_a_grid_exactly_and_never_loses_to_min_max() -> None:
    g = torch.Generator().manual_seed(3)
    s = 0.01 + 0.05 * torch.rand(200, generator=g)
    z = 2 + 10 * torch.rand(200, generator=g)
    u = torch.randint(0, 16, (200, 32), generator=g).float()
    u[:, 0], u[:, 1] = 0, 15
    x = s[:, None] * (u - z[:, None])
    s_fit, z_fit, _ = solve_affine(x, 4)
    torch.testing.assert_close(s_fit, s, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(z_fit, z, rtol=1e-4, atol=1e-4)
    y = heavy_tailed(300, 32, seed=4)
    s_mm, z_mm = rtn_asym(y, 4)
    s_a, z_a, _ = solve_affine(y, 4)
    assert bool((affine_loss(y, s_a, z_a, 4) <= affine_loss(y, s_mm, z_mm.float(), 4) * (1 + 1e-6)).all())


def test_solve_affine_more_starts_never_lose_and_skip_groups_on_their_grid() -> None:
    """Each start is kept only where it lowers a group's error, so four starts are never worse than the first
    alone, and better somewhere on weights off any grid. A group its first start fits exactly takes no
    other: mixed with weights off the grid, it gets the one-start answer bit for bit."""
    ratios = tuple(torch.linspace(1.0, 0.85, 4, dtype=torch.float64).tolist())
    y = heavy_tailed(400, 32, seed=6)
    _, _, l1 = solve_affine(y, 4, None, ratios[:1], 3)
    s4, z4, l4 = solve_affine(y, 4, None, ratios, 3)
    assert bool((l4 <= l1).all()) and float(l4.sum()) < 0.99 * float(l1.sum())
    torch.testing.assert_close(l4, affine_loss(y, s4, z4, 4), rtol=1e-5, atol=1e-12)
    mask = (torch.rand(y.shape, generator=torch.Generator().manual_seed(7)) > 0.02).float()  # outliers left out
    _, _, lm1 = solve_affine(y, 4, mask, ratios[:1], 3)
    _, _, lm4 = solve_affine(y, 4, mask, ratios, 3)
    assert bool((lm4 <= lm1).all())
    grid = gguf_like(8, 32, seed=8)
    both = torch.cat([grid, y[:8]])
    sg, zg, lg = solve_affine(both, 4, None, ratios, 3)
    sg1, zg1, _ = solve_affine(grid, 4, None, ratios[:1], 3)
    assert torch.equal(sg[:8], sg1) and torch.equal(zg[:8], zg1)
    assert bool((lg[:8] <= 1e-10 * grid.square().sum(1)).all())


def test_v3_layer_roundtrip_and_validation_names_the_tensor() -> None:
    w = heavy_tailed(32, 128, seed=5)
    w[1, 2] = 0.8
    qw = _v3(w, normalize="sinkhorn")
    assert qw.outliers.nnz > 0
    t = layer_tensors("P", qw)
    assert set(t) == {f"P.{s}" for s in (*TENSOR_SUFFIXES, "qzeros", "col_scale", "row_steps")}
    assert t["P.qzeros"].shape == (32, 4) and t["P.scales"].dtype == torch.uint8 and t["P.row_steps"].shape == (32,)
    back = quantized_weight_from_tensors("P", t, 4, 32, True, True, 3)
    assert torch.equal(back.dequantize(), qw.dequantize())
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) \['P.row_steps'\]"):
        validate_layer("P", {k: v for k, v in t.items() if k != "P.row_steps"}, 4, 32, True, True, 3)
    with pytest.raises(CheckpointError, match=r"P.scales: dtype torch.float16, expected torch.uint8"):
        validate_layer("P", {**t, "P.scales": t["P.scales"].half()}, 4, 32, True, True, 3)
    bad = t["P.row_steps"].clone()
    bad[2] = float("nan")
    with pytest.raises(CheckpointError, match=r"P.row_steps: contains NaN or Inf"):
        validate_layer("P", {**t, "P.row_steps": bad}, 4, 32, True, True, 3)
    with pytest.raises(CheckpointError, match=r"tensor\(s\) \['P.row_steps'\] present"):
        validate_layer("P", t, 4, 32, True, True, 2)
    with pytest.raises(CheckpointError, match="zero_points must be true with format_version 3"):
        EasyQuantCheckpointConfig.from_dict({"quant_method": "easyquant", "format_version": 3, "bits": 4,
                                             "group_size": 32})  # fmt: skip


def test_v3_bits_per_weight() -> None:
    # codes + 16 bits per group + a float16 unit per row (+ row pointers and 48 bits per outlier where there are
    # outliers; a layer without stores no CSR), + the column scale
    assert bits_per_weight(64, 256, 4, 32, 0, True, False, 3) == pytest.approx(4 + 16 / 32 + 16 / 256)
    assert bits_per_weight(64, 256, 4, 32, 2, True, False, 3) == pytest.approx(
        4 + 16 / 32 + 16 / 256 + (32 * 65 + 2 * 48) / (64 * 256)
    )
    assert bits_per_weight(64, 256, 4, 32, 0, True, True, 3) - bits_per_weight(64, 256, 4, 32, 0, True, False, 3) == (
        pytest.approx(16 / 64)
    )


@pytest.mark.parametrize("tp", [2, 4])
def test_v3_tensor_parallel_slices_recombine(tp: int) -> None:
    qw = _v3(heavy_tailed(128, 256, seed=6))
    rows = 128 // tp
    parts = [slice_rows(qw, r * rows, rows) for r in range(tp)]
    assert torch.equal(stack_rows(parts).dequantize(), qw.dequantize())
    x = torch.randn(3, 256, dtype=torch.float64)
    cols = 256 // tp
    partial = sum(x[:, r * cols : (r + 1) * cols] @ slice_columns(qw, r * cols, cols).dequantize(torch.float64).T
                  for r in range(tp))  # fmt: skip
    torch.testing.assert_close(partial, x @ qw.dequantize(torch.float64).T)


def test_v3_padding_rows_and_embedding_lookup() -> None:
    w = heavy_tailed(40, 64, seed=7)
    w[7, 3] = 0.9
    qw = _v3(w)
    padded = pad_rows(qw, 48)
    d = padded.dequantize()
    assert torch.equal(d[:40], qw.dequantize()) and not d[40:].any()
    ids = torch.tensor([[7, 0], [39, 7]])
    assert torch.equal(dequantize_rows(qw, ids, max_row_nnz(qw.outliers.indptr)), qw.dequantize()[ids])


def test_v3_stack_refuses_mixed_formats() -> None:
    a = _v3(heavy_tailed(16, 64, seed=8))
    b = quantize_group([heavy_tailed(16, 64, seed=9)], QuantSpec.for_version(2, group_size=32, normalize="none"))[0]
    a = type(a)(a.qweight, a.scales, a.outliers, 4, 32, zeros=a.zeros, row_steps=a.row_steps)  # no column scale
    with pytest.raises(ValueError, match="share one format"):
        stack_rows([a, b], ["a", "b"])


def test_v3_auto_column_scale_and_outliers_keep_only_what_helps() -> None:
    # On a 16-level grid per block of 32 (a GGUF's), a column scale would move the weights off the grid and no
    # candidate outlier removes any error: auto keeps no column scale, no outliers, and stores no CSR.
    grid = gguf_like(64, 256, seed=10)
    qw = _v3(grid, meta_bits=8)
    assert qw.col_scale is None and qw.outliers.nnz == 0
    assert float((qw.dequantize() - grid).norm() / grid.norm()) < 0.01
    t = layer_tensors("P", qw)
    assert set(t) == {"P.qweight", "P.scales", "P.qzeros", "P.row_steps"}
    back = quantized_weight_from_tensors("P", t, 4, 32, True, True, 3)
    assert torch.equal(back.dequantize(), qw.dequantize()) and back.outliers.nnz == 0
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) \['P\.outlier_indices', 'P\.outlier_values'\]"):
        validate_layer("P", {**t, "P.outlier_indptr": torch.zeros(65, dtype=torch.int32)}, 4, 32, True, True, 3)
    # Weights whose columns differ in spread, with a planted large weight: the column scale and the outlier stay.
    w = heavy_tailed(64, 256, seed=11) * torch.exp(torch.randn(256, generator=torch.Generator().manual_seed(1)))
    w[5, 9] = 3.0
    qw = _v3(w)
    assert qw.col_scale is not None and qw.outliers.nnz >= 1
    plain = _v3(w, normalize="none")
    assert float((qw.dequantize() - w).norm()) < float((plain.dequantize() - w).norm())


# --- group_meta_bits 6: steps and zeros in 6 bits each, packed four groups to three bytes ---


@pytest.mark.parametrize("groups", [1, 3, 4, 5, 18, 20, 280])
def test_meta6_packing_roundtrip_and_range(groups: int) -> None:
    v = torch.randint(0, 64, (7, groups), dtype=torch.uint8, generator=torch.Generator().manual_seed(groups))
    packed = pack_meta6(v)
    assert packed.dtype == torch.uint8 and packed.shape == (7, meta6_bytes(groups)) == (7, 3 * ((groups + 3) // 4))
    assert torch.equal(unpack_meta6(packed, groups), v)
    # the documented layout: group 4j + i in bits 6i.. of the 24-bit little-endian word of bytes 3j..3j+2
    word = [int(packed[0, 0]) | int(packed[0, 1]) << 8 | int(packed[0, 2]) << 16]
    assert [(word[0] >> (6 * i)) & 63 for i in range(min(groups, 4))] == v[0, :4].tolist()
    with pytest.raises(ValueError, match=r"must lie in \[0, 63\]"):
        pack_meta6(torch.full((1, groups), 64, dtype=torch.int32))


def test_meta6_quantizer_stays_on_its_grid_and_costs_little() -> None:
    w = heavy_tailed(64, 256, seed=21)
    wide, narrow = _v3(w, meta_bits=8), _v3(w, meta_bits=6)
    assert int(narrow.scales.max()) <= 63 and not bool((narrow.zeros % 4).any())  # quarter codes, in sixteenths
    err = [float((q.dequantize() - w).norm() / w.norm()) for q in (wide, narrow)]
    assert err[0] <= err[1] < 1.1 * err[0]  # the narrower grid of steps and zeros costs a little error
    assert narrow.stats is not None and narrow.stats.rel_err == pytest.approx(err[1], rel=1e-5)
    # 8-bit codes keep one byte each (group_meta_bits applies to 4-bit layers)
    eight = _v3(w, bits=8, meta_bits=6)
    assert torch.equal(eight.scales, _v3(w, bits=8).scales) and int(eight.scales.max()) == 255


def test_meta6_layer_roundtrip_validation_and_bits() -> None:
    w = heavy_tailed(32, 640, seed=22)  # 20 groups of 32: five packed words per row
    w[1, 2] = 0.8
    qw = _v3(w, meta_bits=6, normalize="sinkhorn")
    t = layer_tensors("P", qw, 6)
    assert t["P.scales"].shape == t["P.qzeros"].shape == (32, 15) and t["P.scales"].dtype == torch.uint8
    back = quantized_weight_from_tensors("P", t, 4, 32, True, True, 3, 6)
    assert torch.equal(back.scales, qw.scales) and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.dequantize(), qw.dequantize())
    written = sum(x.numel() * x.element_size() * 8 for x in t.values())
    assert bits_per_weight(32, 640, 4, 32, qw.outliers.nnz, True, True, 3, 6) * 32 * 640 == written
    # a one-byte layout read as packed (or the reverse) is refused by its shape, naming the tensor
    with pytest.raises(CheckpointError, match=r"P.scales: shape \[32, 20\], expected \[32, 15\]"):
        validate_layer("P", layer_tensors("P", qw), 4, 32, True, True, 3, 6)
    with pytest.raises(CheckpointError, match=r"P.scales: shape \[32, 15\], expected \[32, 20\]"):
        validate_layer("P", t, 4, 32, True, True, 3)
    with pytest.raises(ValueError, match="off the quarter-code grid"):
        layer_tensors("P", _v3(w, meta_bits=8), 6)
    eight = _v3(w, bits=8)  # 8-bit codes keep bytes in a checkpoint with 6-bit steps and zeros
    t8 = layer_tensors("P", eight, 6)
    assert t8["P.scales"].shape == (32, 20) and torch.equal(t8["P.scales"], eight.scales)
    back8 = quantized_weight_from_tensors("", {k.replace("P.", "."): v for k, v in t8.items()}, 8, 32, True, True, 3, 6)
    assert torch.equal(back8.dequantize(), eight.dequantize())  # whatever the layer's name (vLLM may give none)
    assert bits_per_weight(32, 640, 8, 32, eight.outliers.nnz, True, True, 3, 6) == bits_per_weight(
        32, 640, 8, 32, eight.outliers.nnz, True, True, 3, 8
    )
    # the last packed word's padding must be 0 (K/G = 20 is a whole number of words: pad a 18-group layer)
    w18 = heavy_tailed(8, 576, seed=23)
    t18 = layer_tensors("P", _v3(w18, meta_bits=6, normalize="none"), 6)
    bad = t18["P.qzeros"].clone()
    bad[3, -1] |= 0xC0  # group 19 of row 3, past the 18 groups
    with pytest.raises(CheckpointError, match=r"P.qzeros: the padding after group 17 is not 0"):
        validate_layer("P", {**t18, "P.qzeros": bad}, 4, 32, True, False, 3, 6)


def test_meta6_config_key() -> None:
    base = {"quant_method": "easyquant", "format_version": 3, "bits": 4, "group_size": 32, "zero_points": True}
    cfg = EasyQuantCheckpointConfig.from_dict({**base, "group_meta_bits": 6, "lm_head": True, "lm_head_bits": 8})
    assert cfg.group_meta_bits == 6 and cfg.to_dict()["group_meta_bits"] == 6
    assert cfg.meta_bits_of("model.layers.0.mlp.down_proj") == 6 and cfg.meta_bits_of("lm_head") == 8
    assert "group_meta_bits" not in EasyQuantCheckpointConfig.from_dict(base).to_dict()  # 8: read as before the key
    with pytest.raises(CheckpointError, match=r"group_meta_bits = 7 is not supported"):
        EasyQuantCheckpointConfig.from_dict({**base, "group_meta_bits": 7})
    with pytest.raises(CheckpointError, match=r"group_meta_bits needs format_version 3"):
        EasyQuantCheckpointConfig.from_dict({**base, "format_version": 2, "group_meta_bits": 6})
