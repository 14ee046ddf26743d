"""EasyQuant math: pure tensor functions, no vLLM import (outliers, range solvers, packing, Q(W))."""

from .outliers import OutlierCSR, count_nonfinite, rows_from_indptr, select_outliers, tensor_mean_std
from .packing import SUPPORTED_BITS, check_bits, code_offset, code_range, pack_codes, pack_factor, unpack_codes
from .quantize import (
    AUTO_GROUP_SIZES,
    DEFAULT_METHOD,
    METHODS,
    SUPPORTED_GROUP_SIZES,
    QuantizedWeight,
    QuantSpec,
    QuantStats,
    dequantize,
    dequantize_dense,
    effective_group_size,
    quantize_weight,
    resolve_group_size,
)
from .solvers import AdamParams, SearchParams, group_loss, group_loss_and_grad, quantize_codes, rtn_scales

__all__ = [
    "AUTO_GROUP_SIZES",
    "DEFAULT_METHOD",
    "METHODS",
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "AdamParams",
    "OutlierCSR",
    "QuantSpec",
    "QuantStats",
    "QuantizedWeight",
    "SearchParams",
    "check_bits",
    "code_offset",
    "code_range",
    "count_nonfinite",
    "dequantize",
    "dequantize_dense",
    "effective_group_size",
    "group_loss",
    "group_loss_and_grad",
    "pack_codes",
    "pack_factor",
    "quantize_codes",
    "quantize_weight",
    "resolve_group_size",
    "rows_from_indptr",
    "rtn_scales",
    "select_outliers",
    "tensor_mean_std",
    "unpack_codes",
]
