"""Reading Hugging Face safetensors checkpoints lazily and writing sharded ones with bounded memory."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .format import SAFETENSORS_INDEX_FILE, CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# safetensors dtype codes (https://github.com/huggingface/safetensors, format spec).
_DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


def _allowed_roots(model_dir: Path) -> list[Path]:
    """Where a checkpoint's files may really live: inside its directory, or, for a Hugging Face cache snapshot
    (``.../models--org--name/snapshots/<rev>/``, whose files are links to ``../../blobs/<hash>``), in that
    repository's ``blobs``."""
    root = model_dir.resolve()
    roots = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith(("models--", "datasets--", "spaces--")):
        roots.append(root.parent.parent / "blobs")
    return roots


def resolve_inside(model_dir: str | Path, name: str, what: str = "file") -> Path:
    """``model_dir / name``, after checking that ``name`` is a plain relative path and that the file, symbolic
    links followed, lies inside ``model_dir`` (see :func:`_allowed_roots`). Raises CheckpointError naming it."""
    model_dir = Path(model_dir)
    rel = Path(name)
    if not name or "\0" in name or rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(f"{model_dir}: {what} {name!r} is not a path inside the model directory")
    path = model_dir / rel
    try:
        real = path.resolve()
        roots = _allowed_roots(model_dir)
    except (OSError, RuntimeError, ValueError) as e:  # a symbolic link loop, ...
        raise CheckpointError(f"{path}: {what} cannot be resolved ({e})") from None
    blobs = roots[1:]
    if not (real == roots[0] or roots[0] in real.parents or any(real.parent == b for b in blobs)):
        raise CheckpointError(
            f"{path}: {what} resolves to {real}, outside the model directory; refusing to read it (copy the file "
            "into the directory if it belongs to the model)"
        )
    return path


def resolve_weight_files(model_dir: str | Path) -> dict[str, Path]:
    """Map every tensor name of a checkpoint directory to the safetensors file that holds it.

    Uses ``model.safetensors.index.json`` when present (and checks that every shard it names
    exists), else every ``*.safetensors`` file in the directory. Refuses pickle checkpoints, and any weight file
    that is not inside the directory (an index entry such as ``../x.safetensors`` or an absolute path, or a
    symbolic link that leads out).

    Raises:
        CheckpointError naming the file and the problem.
    """
    model_dir = Path(model_dir)
    index = model_dir / SAFETENSORS_INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
        files = sorted(set(weight_map.values()))
        for f in files:
            resolve_inside(model_dir, f, f"weight file named by {SAFETENSORS_INDEX_FILE}")
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise CheckpointError(f"{index}: names shard(s) that do not exist: {missing}")
        mapping = {name: model_dir / f for name, f in weight_map.items()}
        with ExitStack() as stack:  # the index must agree with the shards' own headers
            for f in files:
                names = set(_open(model_dir / f, stack).keys())
                wrong = [n for n, g in weight_map.items() if g == f and n not in names]
                if wrong:
                    raise CheckpointError(f"{model_dir / f}: index lists tensor(s) not in this shard: {wrong[:5]}")
        return mapping
    files = sorted(model_dir.glob("*.safetensors"))
    for f in files:
        resolve_inside(model_dir, f.name, "weight file")
    if not files:
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{model_dir}: only pickle weights ({', '.join(pickles)}); pickle checkpoints can run arbitrary "
                "code and are refused. Convert them to safetensors first (transformers: "
                "save_pretrained(..., safe_serialization=True))"
            )
        raise CheckpointError(f"{model_dir}: no *.safetensors weights found")
    mapping: dict[str, Path] = {}
    with ExitStack() as stack:
        for f in files:
            for name in _open(f, stack).keys():  # noqa: SIM118 (safe_open has keys(), no __iter__)
                if name in mapping:
                    raise CheckpointError(f"{f}: tensor {name} also in {mapping[name]}")
                mapping[name] = f
    return mapping


def _open(path: Path, stack: ExitStack) -> Any:
    try:
        return stack.enter_context(safe_open(str(path), framework="pt"))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _data_offsets(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """Where a safetensors file's tensors lie: ``(start of the data, {name: (begin, end)})`` from its header
    (8-byte little-endian length, then JSON), read once. The header itself was checked by ``safe_open``."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return 8 + length, {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}


class CheckpointReader:
    """Lazy access to the tensors of a safetensors checkpoint: one tensor in memory at a time.

    Headers are read once here. Each :meth:`get` reads exactly its tensor's bytes with one positioned read:
    nothing stays mapped (``safe_open`` memory-maps the file, and every page a read touches stays resident while
    the handle is open), and nothing is parsed again (``safe_open`` parses a shard's whole header per open: with the
    thousands of tensors of a MoE shard that was 10 ms per tensor, quadratic in the shard).
    """

    def __init__(self, model_dir: str | Path) -> None:
        self._where = resolve_weight_files(model_dir)
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        with ExitStack() as stack:
            for f in sorted(set(self._where.values())):
                handle = _open(f, stack)
                start, offsets = _data_offsets(f)
                size = f.stat().st_size
                for name in handle.keys():  # noqa: SIM118 (safe_open has keys(), no __iter__)
                    sl = handle.get_slice(name)
                    self._meta[name] = (tuple(sl.get_shape()), sl.get_dtype())
                    b, e = offsets[name]
                    if start + e > size:
                        raise CheckpointError(f"{f}: truncated: tensor {name} ends at byte {start + e} of {size}")
                    self._offsets[name] = (start + b, e - b)

    def names(self) -> list[str]:
        """Tensor names in the order of the index (or of the files, then each file's order)."""
        return list(self._where)

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype_code(self, name: str) -> str:
        """safetensors dtype code, e.g. ``"F16"``, ``"BF16"``, ``"I32"``."""
        return self._meta[name][1]

    def nbytes(self, name: str) -> int:
        """Bytes of the tensor's data, from its header (nothing is read)."""
        shape, code = self._meta[name]
        return math.prod(shape) * _CODE_DTYPES[code].itemsize

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor; a truncated or corrupt file raises CheckpointError naming it."""
        f = self._where[name]
        shape, code = self._meta[name]
        offset, nbytes = self._offsets[name]
        dtype = _CODE_DTYPES.get(code)
        if dtype is None or nbytes != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{f}: tensor {name}: dtype {code} and shape {list(shape)} do not match its bytes")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        buf = bytearray(nbytes)
        try:
            with open(f, "rb", buffering=0) as fh:
                fh.seek(offset)
                got = fh.readinto(buf)
        except OSError as e:
            raise CheckpointError(f"{f}: cannot read tensor {name} ({e})") from None
        if got != nbytes:
            raise CheckpointError(f"{f}: cannot read tensor {name} (truncated: {got} of {nbytes} bytes)")
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


@contextmanager
def open_checkpoint(model_dir: str | Path) -> Iterator[CheckpointReader]:
    """Context manager yielding a :class:`CheckpointReader` (files are opened per read)."""
    yield CheckpointReader(model_dir)


class ShardedSafetensorsWriter:
    """Write tensors one at a time into size-capped safetensors shards, holding none in memory.

    Each shard's data goes straight to a scratch file; when the shard is full its header (which must
    come first and needs every tensor's size -- unknown in advance for the outlier arrays) is written
    to the final file, followed by the data copied from scratch. Memory use is one tensor at a time.
    File names follow transformers: ``model.safetensors`` for one shard, else
    ``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json``.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 2 * 1024**3) -> None:
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._shards: list[tuple[Path, list[str]]] = []
        self._header: dict[str, Any] = {}
        self._offset = 0
        self._data: Any = None
        self._total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _DTYPE_CODES:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if self._header and self._offset + nbytes > self.max_shard_bytes:
            self._finish_shard()
        if self._data is None:
            # Stays open across add() calls until the shard is finished; closed in _finish_shard.
            self._data = open(self.out_dir / f".shard-{len(self._shards):05d}.data", "wb")  # noqa: SIM115
        if nbytes:
            self._data.write(t.reshape(-1).view(torch.uint8).numpy().data)  # no intermediate copy
        self._header[name] = {
            "dtype": _DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self._offset, self._offset + nbytes],
        }
        self._offset += nbytes
        self._total += nbytes

    def _finish_shard(self) -> None:
        data_path = Path(self._data.name)
        self._data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # data must start 8-byte aligned
        path = self.out_dir / f".shard-{len(self._shards):05d}.safetensors"
        with open(path, "wb") as out, open(data_path, "rb") as src:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(src, out, 16 * 1024**2)
        data_path.unlink()
        self._shards.append((path, list(self._header)))
        self._header, self._offset, self._data = {}, 0, None

    def close(self) -> list[str]:
        """Finish the last shard, give the shards their final names, write the index if sharded."""
        if self._data is not None:
            self._finish_shard()
        count = len(self._shards)
        names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        weight_map: dict[str, str] = {}
        for (tmp, tensors), final in zip(self._shards, names, strict=True):
            os.replace(tmp, self.out_dir / final)
            weight_map.update(dict.fromkeys(tensors, final))
        if count > 1:
            index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
            (self.out_dir / SAFETENSORS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names
