"""Where the converter may write: destination checks, the private temporary directory, fsync, the atomic commit.

The converter owns exactly two things on disk: the temporary directory it creates next to ``DST``, and, with
``--overwrite``, an existing ``DST`` that is itself an EasyQuant checkpoint. Everything else (the source model,
a directory that merely holds other files, a file, a symbolic link) is refused before anything is written, and
checked again just before the commit, so a change made while the conversion ran cannot slip through either.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from easyquant_vllm.format import CONFIG_FILE, QUANT_METHOD

log = logging.getLogger("easyquant.convert")


class DestinationError(ValueError):
    """``DST`` is not a place the converter may write; the message says what is there."""


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse a ``dst`` that is, contains or lies inside ``src`` (after resolving symbolic links), that exists
    without ``overwrite``, or that ``overwrite`` would have to replace although it is not an EasyQuant checkpoint.

    A symbolic link at ``dst`` (dangling or not) counts as existing and is never replaced: replacing the link
    would leave its target behind, replacing the target would write where the user did not point.
    """
    src_real, dst_real = src.resolve(), dst.resolve()
    if dst_real == src_real:
        raise DestinationError(f"{dst}: is the source directory {src}; choose another output directory")
    if src_real in dst_real.parents:
        raise DestinationError(f"{dst}: is inside the source directory {src}; choose a directory outside it")
    if dst_real in src_real.parents:
        raise DestinationError(
            f"{dst}: contains the source directory {src}, which replacing it would delete; choose another "
            "output directory"
        )
    if dst.is_symlink():
        target = os.readlink(dst)
        if not overwrite:
            raise DestinationError(f"{dst}: already exists (a symbolic link to {target})")
        raise DestinationError(
            f"{dst}: is a symbolic link (to {target}); --overwrite replaces only a real EasyQuant checkpoint "
            "directory. Remove the link or choose another output directory"
        )
    if not dst.exists():
        return
    if not overwrite:
        raise DestinationError(f"{dst}: already exists (pass --overwrite to replace an EasyQuant checkpoint there)")
    if not dst.is_dir():
        raise DestinationError(f"{dst}: is a file, not a directory; --overwrite replaces only an EasyQuant checkpoint")
    why = not_a_checkpoint(dst)
    if why:
        raise DestinationError(
            f"{dst}: not an EasyQuant checkpoint ({why}); --overwrite replaces only a directory whose config.json "
            f"says quant_method {QUANT_METHOD!r}. Remove it yourself or choose another output directory"
        )


def not_a_checkpoint(path: Path) -> str | None:
    """None if ``path`` is an EasyQuant checkpoint directory by its ``config.json`` (or empty: nothing to lose),
    else what is there instead."""
    count = sum(1 for _ in path.iterdir())
    if count == 0:
        return None
    entries = f"{count} entr{'y' if count == 1 else 'ies'}"
    config = path / CONFIG_FILE
    if not config.is_file() or config.is_symlink():
        return f"no {CONFIG_FILE}; {entries}"
    try:
        qc = json.loads(config.read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return f"its {CONFIG_FILE} is not a JSON object; {entries}"
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != QUANT_METHOD:
        found = f"quant_method {method!r}" if method is not None else "no quantization_config"
        return f"{CONFIG_FILE} has {found}; {entries}"
    return None


@contextmanager
def staging_directory(dst: Path) -> Iterator[Path]:
    """A fresh, private directory next to ``dst`` for the output; removed with everything in it on any error.

    The parents of ``dst`` that did not exist are created, and removed again (when still empty) on error.
    """
    created = [p for p in (dst.parent, *dst.parent.parents) if not p.exists()]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.easyquant-tmp-", dir=dst.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # deepest first
            try:
                p.rmdir()
            except OSError:
                break
        raise


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and the directories that name them to stable storage.

    Without it a power loss shortly after the rename can leave ``DST`` in place with truncated shards: the
    rename may reach the disk before the data does.
    """
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (the names created or renamed in it)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # EINVAL: a file system without fsync on directories; the files themselves are flushed
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def commit(src: Path, tmp: Path, dst: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` into place as ``dst``, flushed to disk first.

    ``dst`` is checked again first (it may have changed while the conversion ran). An existing checkpoint there
    (``--overwrite``) is moved aside, replaced, then deleted. Once ``dst`` holds the new checkpoint nothing here
    raises, not even an interrupt: a leftover that cannot be deleted is reported, not fatal.
    """
    check_destination(src, dst, overwrite)
    fsync_tree(tmp)
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.easyquant-old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
        try:
            os.replace(tmp, dst)
        except BaseException:
            os.replace(old / dst.name, dst)  # put the old checkpoint back
            old.rmdir()
            raise
    else:
        os.replace(tmp, dst)
    try:  # committed: from here on, problems are warnings
        fsync_dir(dst.parent)
        if old is not None:
            shutil.rmtree(old)
    except (Exception, KeyboardInterrupt) as e:
        leftover = f"; the checkpoint it replaced is still at {old}" if old is not None and old.exists() else ""
        log.warning("easyquant-convert: wrote %s, then: %s%s", dst, f"{type(e).__name__}: {e}", leftover)
