"""Command-line entry points: ``easyquant-convert`` and ``easyquant-validate``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

from easyquant_vllm.format import CheckpointError, validate_checkpoint
from easyquant_vllm.quant import FORMAT_DEFAULTS, METHODS, NORMALIZE, SUPPORTED_BITS

from .convert import (
    BUDGET_AUTO,
    DEFAULT_SKIP_PATTERNS,
    ConversionError,
    ConvertOptions,
    convert,
    summary_table,
)

DESCRIPTION = """\
Convert a Hugging Face model directory (safetensors) into an EasyQuant checkpoint: data-free
weight-only quantization. For every linear weight inside the decoder blocks, the few n-sigma
outliers are kept in float16 (CSR) and the rest is quantized to int4 (or int8) per group with an
optimised range. No calibration data is used.

Format version 3 (default) stores each group of 32 or 64 columns with a zero point and a step in 12 bits
(6-bit multiples of a per-row unit), keeps a scale per input column and at most 0.25 % outliers on the
layers where they remove error. Each fused module gets the group size and outliers that remove the most
error within the bits version 2's defaults would store (--bits-per-weight auto; off: groups of 32
everywhere). --format-version 2 and 1 (the paper's symmetric method) stay available. The defaults
were chosen by fidelity to the unquantized model (docs/results.md).

The output projection (lm_head; with tied embeddings the one embedding matrix) is quantized in 8 bits
where vLLM serves it quantized for the model's architecture (Llama, Mistral, Qwen2/3, Qwen MoEs, Gemma-3,
...; untied heads of Mixtral and DeepSeek); elsewhere it is kept, as are other embeddings, norms and
biases. --no-lm-head keeps it everywhere, --lm-head insists, --lm-head-bits 4 halves it again. The output
is written to a private temporary directory next to DST, validated, flushed to disk and renamed into
place only when everything succeeded. DST must not be, contain or lie inside SRC; --overwrite
replaces only an EasyQuant checkpoint.
Serve it with
  vllm serve DST --quantization easyquant
"""

EPILOG = """\
examples:
  easyquant-convert ./Llama-3-8B ./Llama-3-8B-easyquant
  easyquant-convert ./model ./out --group-size -1            # per output channel, as in the paper
  easyquant-convert ./model ./out --skip 'layers\\.0\\.'       # leave the first block in fp16
  easyquant-convert ./model ./out --no-lm-head               # keep the lm_head in the source dtype
  easyquant-convert ./model ./out --lm-head-bits 4           # int4 lm_head: a quarter of bf16, less faithful
  easyquant-convert ./model ./out --bits-per-weight 4.25     # smaller: a group size per module within 4.25 bits
  easyquant-convert ./model ./out --bits-per-weight off      # groups of 32 everywhere: larger, the most faithful
exit status: 0 success, 1 bad input (message names the file/tensor), 130 interrupted.
"""


def _group_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 32, 64, 128, -1 or auto, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="easyquant-convert",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = ConvertOptions()
    p.add_argument(
        "src", type=Path, metavar="SRC_DIR", help="Hugging Face model directory (config.json + *.safetensors)"
    )
    p.add_argument("dst", type=Path, metavar="DST_DIR", help="output directory; must not exist unless --overwrite")
    p.add_argument("--bits", type=int, default=d.bits, choices=SUPPORTED_BITS, help="code width (default %(default)s)")
    p.add_argument(
        "--group-size", type=_group_size, default=d.group_size,
        help="input columns per step size: 32, 64, 128, -1 (one per output channel) or auto: for version 3 the "
        "smallest of 32/64/128 that divides every quantized input dim, for versions 1-2 the largest (default "
        "%(default)s); config.json records the number",
    )  # fmt: skip
    p.add_argument(
        "--format-version", type=int, choices=(1, 2, 3), default=d.format_version,
        help="3: compact steps (8-bit multiples of a per-row unit, zeros in sixteenths of a code), groups of 32, "
        "column scales and outliers (at most 0.25 %%) per layer where they remove error; 2: zero points + column "
        "scales with float16 steps, 0.25 %% outliers; 1: "
        "symmetric codes, 1 %% outliers, as the paper (default %(default)s). The options below override a "
        "version's defaults",
    )  # fmt: skip
    p.add_argument(
        "--zero-points", action=argparse.BooleanOptionalAction, default=None,
        help="asymmetric codes with a zero point per group (versions 2 and 3, which needs them; default: on)",
    )  # fmt: skip
    p.add_argument(
        "--normalize", choices=NORMALIZE, default=None,
        help="column scales before quantizing: sinkhorn (version 2 default), none, or auto (version 3 default: "
        "Sinkhorn where it halves a layer's error, decided on a sample of its rows)",
    )  # fmt: skip
    p.add_argument(
        "--outlier-threshold", type=float, default=d.outlier_threshold, metavar="N",
        help="keep |w - mean| >= N * std in float16 (per tensor; default %(default)s, 0 disables)",
    )  # fmt: skip
    p.add_argument(
        "--max-outlier-fraction", type=float, default=None, metavar="F",
        help="cap on the outlier fraction per tensor; the largest deviations win (default: 0.0025 for versions 2 "
        "and 3, 0.01 for version 1). Version 3 keeps only the candidates that remove error",
    )  # fmt: skip
    p.add_argument(
        "--group-meta-bits", type=int, choices=(6, 8), default=None, metavar="{6,8}",
        help="version 3: bits for each group's step multiplier and for its zero point in the 4-bit layers. 6 packs "
        "both into 12 bits per group (4.375 bits per weight at groups of 32 before outliers and row terms); 8 "
        f"stores a byte each, as version 3 began (4.5). Default: the format's ({FORMAT_DEFAULTS[3]['meta_bits']}). "
        "Kernels unpack 6-bit ones at load, so served memory is the same either way",
    )  # fmt: skip
    p.add_argument(
        "--expert-max-bits", type=float, default=d.expert_max_bits, metavar="B",
        help="bits per weight a routed expert's projection may store at most: its outliers are capped to what the "
        "codes and group metadata leave (default %(default)s; 0 gives experts the dense layers' cap)",
    )  # fmt: skip
    p.add_argument(
        "--bits-per-weight", type=_budget, default=d.bits_per_weight, metavar="{B,auto,off}",
        help="a size budget: the quantized layers but routed experts and the lm_head store at most B bits per weight "
        "on average (estimated on a sample of rows; the summary prints what was written). Each fused module (qkv,"
        " gate/up, o, down) gets its own group size (32, 64 or 128) and keeps or drops its outliers, chosen "
        "data-free from the weights' own errors (relative squared error, every weight alike); config.json lists "
        "the modules that differ under group_sizes. Routed experts (--expert-max-bits) and the lm_head keep their"
        " layout. Default auto: the bits format version 2's defaults would store for the same layers (groups of "
        "128 or 64 with a float16 step each, column scales, 0.25 %% outliers), chosen among groups of 32 and 64 "
        "only, so the decoder layers store about as many bits as version 2's did (held-out KL divergence at those"
        " bits: 0.53x / 0.63x SINQ's on Gemma-3-270M text / chat, 0.51x / 0.42x SINQ g64's on Qwen2.5-Coder-1.5B;"
        " SmolLM2 fits groups of 32 everywhere; docs/results.md). auto applies to version 3's 4-bit defaults "
        "only: with --group-size, --bits 8 or --format-version 1/2 the layout is the one they give. off: every "
        "module in groups of 32 (4.43-4.53 bits on our models, the most faithful). A number needs version 3, "
        "4-bit codes and --group-size auto; groups of 128 need K / (tensor-parallel size) to be a multiple of 128",
    )  # fmt: skip
    p.add_argument(
        "--method", choices=METHODS, default=d.method,
        help="range optimiser: search (default; version 2: the clip ratio among 0.9/0.95/1.0 of min-max with the "
        "least 4th-power error; version 1: clip-ratio search + alternating least squares), adam (the paper's: "
        "Adam on Eq. 2, symmetric only), rtn (min-max / max-abs, no optimisation)",
    )  # fmt: skip
    p.add_argument(
        "--adam-lr", type=float, default=d.adam_lr, help="with --method adam (paper: 1e-4 LLaMA, 1e-3 BLOOM)"
    )
    p.add_argument(
        "--adam-steps", type=int, default=d.adam_steps, help="with --method adam (paper: 500 LLaMA, 100 BLOOM)"
    )
    p.add_argument(
        "--skip", action="append", default=[], metavar="PATTERN",
        help="regex (searched in the tensor name) of weights to leave unquantized; repeatable. Always skipped: "
        + ", ".join(DEFAULT_SKIP_PATTERNS),
    )  # fmt: skip
    p.add_argument(
        "--quantize-pattern", default=d.quantize_pattern, metavar="REGEX",
        help="which 2-D weights are candidates (default: inside decoder blocks, %(default)s). The vLLM plugin "
        "serves quantized linear layers only: do not widen it to embeddings",
    )  # fmt: skip
    p.add_argument(
        "--lm-head", action=argparse.BooleanOptionalAction, default=d.lm_head,
        help="quantize the output projection (lm_head; with tied embeddings the one embedding matrix, which then "
        "serves the input lookups too). It is read in full for every generated token: 0.45 GB in bf16 for a 150k "
        "vocabulary at hidden 1536; in 8 bits it decodes 1.2-1.5x faster on CPU for +0.0003 KLD (docs/serving.md, "
        "docs/results.md). Default: on where vLLM's model for the architecture quantizes its vocabulary layers, "
        "off elsewhere (the summary says why); --no-lm-head keeps it, --lm-head insists",
    )  # fmt: skip
    p.add_argument(
        "--lm-head-bits", type=int, choices=SUPPORTED_BITS, default=d.lm_head_bits, metavar="{4,8}",
        help="code width of the quantized lm_head. 8 (default) halves its bytes against bf16 at almost no "
        "fidelity cost; 4 reads a quarter of them, at a visible one (docs/results.md). On CUDA an 8-bit head is "
        "served dequantized to bf16 (the CUDA kernels take 4-bit codes): as fast as an unquantized head",
    )  # fmt: skip
    p.add_argument("--device", default=d.device, help="where to compute: cpu or cuda[:N] (default %(default)s)")
    p.add_argument(
        "--max-shard-size", type=float, default=d.max_shard_bytes / 1024**3, metavar="GIB",
        help="output shard size cap in GiB (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace DST if it is an EasyQuant checkpoint (only after success; anything else is refused)",
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="check the input and print the plan; write nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in logs)")
    p.add_argument("-v", "--verbose", action="store_true", help="one log line per tensor")
    return p


class _Interrupts:
    """SIGINT and SIGTERM (``kill``) as KeyboardInterrupt, which cleans up, until DST is committed; from then on
    they are ignored: the conversion is done, and its exit status must say so."""

    def __init__(self) -> None:
        self.committed = False
        self.previous: dict[int, object] = {}

    def __enter__(self) -> _Interrupts:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():  # main() may be called again in this process (tests)
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def commit(self) -> None:
        self.committed = True

    def _handle(self, signum: int, frame: object) -> None:
        if not self.committed:
            raise KeyboardInterrupt


def _budget(text: str) -> float | str | None:
    """``--bits-per-weight``: a number of bits per weight, ``auto`` (version 2's size) or ``off``."""
    if text in ("auto", "off"):
        return None if text == "off" else BUDGET_AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bits per weight, auto or off, not {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    opts = ConvertOptions(
        bits=args.bits,
        group_size=args.group_size,
        format_version=args.format_version,
        zero_points=args.zero_points,
        normalize=args.normalize,
        outlier_threshold=args.outlier_threshold,
        max_outlier_fraction=args.max_outlier_fraction,
        group_meta_bits=args.group_meta_bits,
        expert_max_bits=args.expert_max_bits if args.expert_max_bits > 0 else None,
        bits_per_weight=args.bits_per_weight,
        method=args.method,
        adam_lr=args.adam_lr,
        adam_steps=args.adam_steps,
        quantize_pattern=args.quantize_pattern,
        skip=args.skip,
        lm_head=args.lm_head,
        lm_head_bits=args.lm_head_bits,
        device=args.device,
        max_shard_bytes=int(args.max_shard_size * 1024**3),
        overwrite=args.overwrite,
    )
    with _Interrupts() as interrupts:
        return _run(args, opts, interrupts)


def _run(args: argparse.Namespace, opts: ConvertOptions, interrupts: _Interrupts) -> int:
    try:
        report = convert(args.src, args.dst, opts, progress=not args.no_progress, dry_run=args.dry_run,
                         on_commit=interrupts.commit)  # fmt: skip
    except (ConversionError, ValueError, OSError) as e:
        print(f"easyquant-convert: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"easyquant-convert: interrupted; nothing was written to {args.dst}", file=sys.stderr)
        return 130
    if args.dry_run:
        print(f"would quantize {len(report['quantize'])} tensors with group size {report['group_size']}:")
        for name in report["quantize"]:
            print(f"  {name}")
        print(f"left as they are (2-D): {report['not_converted']}")
        return 0
    # DST is committed: from here on nothing may turn success into a failure (a closed pipe included).
    try:
        print(summary_table(report))
        print(f"wrote {args.dst} (report: {args.dst / 'easyquant_report.json'})")
        sys.stdout.flush()
    except BaseException as e:
        with contextlib.suppress(BaseException):
            print(f"easyquant-convert: wrote {args.dst}; could not print the summary ({type(e).__name__}: {e})",
                  file=sys.stderr)  # fmt: skip
        _quiet_stdout()
    return 0


def _quiet_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so that the interpreter's final flush cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def validate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="easyquant-validate",
        description="Check an EasyQuant checkpoint directory against the format (docs/format.md).",
    )
    p.add_argument("model_dir", type=Path)
    args = p.parse_args(argv)
    try:
        summary = validate_checkpoint(args.model_dir)
    except CheckpointError as e:
        print(f"easyquant-validate: invalid: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
