"""Model size on disk and in memory: an EasyQuant checkpoint vs the same model in fp16.

    python bench/model_size.py SRC_DIR DST_DIR

Breaks the EasyQuant checkpoint into codes, scales, outliers (CSR) and the tensors kept as they are
(embeddings, norms, biases), and compares with the source model stored in fp16. "In memory (int4
CPU path)" is what the torch-int4-cpu kernel keeps: the same packed codes, scales in the activation
dtype (2 bytes), and the outliers as a torch CSR matrix (int64 indices, float32 values: 12 bytes per
outlier instead of 6 on disk).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from easyquant_vllm.format import (  # noqa: E402
    OUTLIER_INDICES,
    OUTLIER_INDPTR,
    OUTLIER_VALUES,
    QWEIGHT,
    SCALES,
)
from easyquant_vllm.safetensors_io import open_checkpoint  # noqa: E402


def sizes(model_dir: Path) -> dict[str, int]:
    out = {"codes": 0, "scales": 0, "outliers": 0, "kept": 0, "kept_fp16": 0, "outlier_count": 0, "rows": 0}
    with open_checkpoint(model_dir) as ckpt:
        for name in ckpt.names():
            numel = math.prod(ckpt.shape(name))
            nbytes = ckpt.nbytes(name)
            suffix = name.rsplit(".", 1)[-1]
            if suffix == QWEIGHT:
                out["codes"] += nbytes
            elif suffix == SCALES:
                out["scales"] += nbytes
            elif suffix in (OUTLIER_INDPTR, OUTLIER_INDICES, OUTLIER_VALUES):
                out["outliers"] += nbytes
                if suffix == OUTLIER_VALUES:
                    out["outlier_count"] += numel
                if suffix == OUTLIER_INDPTR:
                    out["rows"] += numel - 1
            else:
                out["kept"] += nbytes
                out["kept_fp16"] += numel * 2
    return out


def fp16_bytes(model_dir: Path) -> int:
    with open_checkpoint(model_dir) as ckpt:
        return sum(math.prod(ckpt.shape(name)) * 2 for name in ckpt.names())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    args = p.parse_args()
    s = sizes(args.dst)
    fp16 = fp16_bytes(args.src)
    mib = 1024**2
    quantized = s["codes"] + s["scales"] + s["outliers"]
    in_memory_outliers = s["outlier_count"] * 12 + (s["rows"] + 1) * 8
    print(f"# {args.dst.name} vs {args.src.name} in fp16")
    print("| part | on disk (MiB) | in memory, int4 CPU path (MiB) |\n|---|---|---|")
    print(f"| packed int4 codes | {s['codes'] / mib:.1f} | {s['codes'] / mib:.1f} |")
    print(f"| scales (fp16) | {s['scales'] / mib:.1f} | {s['scales'] / mib:.1f} |")
    print(
        f"| outliers (CSR; {s['outlier_count']:,} values) | {s['outliers'] / mib:.1f} | "
        f"{in_memory_outliers / mib:.1f} |"
    )
    print(
        f"| tensors kept as they are (embeddings, norms), as stored | {s['kept'] / mib:.1f} | {s['kept'] / mib:.1f} |"
    )
    total = quantized + s["kept"]
    in_memory = total - s["outliers"] + in_memory_outliers
    print(f"| **total** | **{total / mib:.1f}** | **{in_memory / mib:.1f}** |")
    print(f"\nSame model in fp16: {fp16 / mib:.1f} MiB. Quantized layers alone: {quantized / mib:.1f} MiB vs "
          f"{(fp16 - s['kept_fp16']) / mib:.1f} MiB in fp16 ({(fp16 - s['kept_fp16']) / quantized:.2f}x smaller); "
          f"the outliers are {100 * s['outliers'] / quantized:.1f} % of them. With the kept tensors in fp16 too: "
          f"{(quantized + s['kept_fp16']) / mib:.1f} MiB "
          f"({fp16 / (quantized + s['kept_fp16']):.2f}x smaller).")  # fmt: skip


if __name__ == "__main__":
    main()
