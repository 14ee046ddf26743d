"""Where the converter may write: destination checks, the private temporary directory, fsync, the atomic commit.

The converter owns exactly two things on disk: the temporary directory it creates next to ``DST``, and, with
``--overwrite``, an existing ``DST`` that is itself an EasyQuant checkpoint. Everything else (the source model,
a directory that merely holds other files, a file, a symbolic link) is refused before anything is written, and
checked again just before the commit, so a change made while the conversion ran cannot slip through either.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from easyquant_vllm.format import CONFIG_FILE, QUANT_METHOD

log = logging.getLogger("easyquant.convert")


class DestinationError(ValueError):
    """``DST`` is not a place the converter may write; the message says what is there."""


def absolute(path: str | Path) -> Path:
    """``path`` made absolute without resolving links (``.``, ``..`` and ``DST/`` become real names)."""
    return Path(os.path.abspath(path))


def check_destination(src: Path, dst: Path, overwrite: bool) -> os.stat_result | None:
    """Refuse a ``dst`` that is, contains or lies inside ``src`` (after resolving symbolic links), that exists
    without ``overwrite``, or that ``overwrite`` would have to replace although it is not an EasyQuant checkpoint.

    Returns the ``stat`` of the checkpoint ``overwrite`` may replace (its identity is checked again at the commit),
    or None where ``dst`` does not exist. A symbolic link at ``dst`` (dangling or not) counts as existing and is
    never replaced: replacing the link would leave its target behind, replacing the target would write where the
    user did not point.
    """
    dst = absolute(dst)
    if dst.name in ("", ".", ".."):
        raise DestinationError(f"{dst}: not a directory name the converter can create")
    try:
        src_real, dst_real = src.resolve(), dst.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symbolic link loop, a NUL byte, ...
        raise DestinationError(f"{dst}: cannot resolve the path ({e})") from None
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
        return None
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
    return dst.lstat()


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
    except (OSError, ValueError, AttributeError, RecursionError):
        return f"its {CONFIG_FILE} is not a JSON object; {entries}"
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != QUANT_METHOD:
        found = f"quant_method {method!r}" if method is not None else "no quantization_config"
        return f"{CONFIG_FILE} has {found}; {entries}"
    return None


@dataclass
class Staging:
    """The converter's own place next to ``dst``: ``tmp`` (private until the commit), the parents it created."""

    dst: Path
    tmp: Path = Path()
    created: list[Path] = field(default_factory=list)
    committed: bool = False


@contextmanager
def staging_directory(dst: Path) -> Iterator[Staging]:
    """A fresh directory next to ``dst`` for the output; removed with everything in it on any error before the
    commit. The parents of ``dst`` that did not exist are created, and removed again (when still empty).

    The directory gets the permissions a plain ``mkdir`` would (the umask's), not ``mkdtemp``'s 0700: the
    checkpoint is for a server that may run as another user.
    """
    dst = absolute(dst)
    staging = Staging(dst, created=[p for p in (dst.parent, *dst.parent.parents) if not p.exists()])
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        staging.tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.easyquant-tmp-", dir=dst.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging.tmp, 0o777 & ~umask)
        yield staging
    except BaseException:
        if not staging.committed:
            if staging.tmp != Path():
                shutil.rmtree(staging.tmp, ignore_errors=True)
            for p in staging.created:  # deepest first
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


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM held back until the block ends, then handed to the handlers they would have reached: the
    renames of a commit, its flag and its cleanup happen together, or not at all.

    Python-level: the handlers are swapped for one that notes the signal. (A thread signal mask would not do: the
    process has other threads, OpenMP's, and the kernel delivers a process signal to any thread not blocking it.)
    Signals reach Python handlers only in the main thread; elsewhere there is nothing to defer.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = (signal.SIGINT, signal.SIGTERM)
    pending: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in held}
    for sig in held:
        signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in pending[:1]:  # one interruption is enough
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # linux/fs.h
_AT_FDCWD = -100


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux ``renameat2``: True if done, False where the kernel, libc or file system lacks it (the caller falls
    back); any other failure raises OSError."""
    fn = getattr(_LIBC, "renameat2", None) if _LIBC is not None else None
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def commit(src: Path, staging: Staging, overwrite: bool, on_commit: Callable[[], None] | None = None) -> None:
    """Move the finished output into place as ``dst``: flushed to disk, ``dst`` checked again, then renamed.

    Without a checkpoint to replace the rename never replaces anything (``RENAME_NOREPLACE``): a directory that
    appeared at ``dst`` meanwhile is refused, not deleted. With one (``--overwrite``) the two are swapped in one
    step (``RENAME_EXCHANGE``), and the directory swapped out is deleted only if it is the checkpoint that was
    checked (same inode, still an EasyQuant checkpoint); otherwise it is swapped back and the commit refused. The
    renames, the committed flag, ``on_commit`` and the cleanup run with SIGINT/SIGTERM deferred. Once ``dst`` holds
    the new checkpoint nothing here raises: a leftover that cannot be deleted is reported, not fatal.
    """
    dst, tmp = staging.dst, staging.tmp
    fsync_tree(tmp)
    for p in staging.created:  # the new parents' own entries
        fsync_dir(p.parent)
    checked = check_destination(src, dst, overwrite)
    old: Path | None = None
    with _signals_deferred():  # an interrupt from here on arrives once the commit is complete, cleanup included
        if checked is None:
            _rename_noreplace(tmp, dst)
        else:
            old = _exchange(tmp, dst, checked)
        staging.committed = True
        if on_commit is not None:
            on_commit()
        try:  # committed: from here on, problems are warnings
            fsync_dir(dst.parent)
        except OSError as e:
            log.warning("easyquant-convert: wrote %s, but could not flush its directory entry: %s", dst, e)
        if old is not None:
            try:
                shutil.rmtree(old.parent if old.parent.name.startswith(f".{dst.name}.easyquant-old-") else old)
            except OSError as e:
                log.warning("easyquant-convert: wrote %s, but the checkpoint it replaced is still at %s: %s", dst,
                            old, e)  # fmt: skip


def _rename_noreplace(tmp: Path, dst: Path) -> None:
    try:
        if _renameat2(tmp, dst, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise DestinationError(f"{dst}: appeared while the conversion ran; nothing was replaced") from None
    if dst.exists() or dst.is_symlink():
        raise DestinationError(f"{dst}: appeared while the conversion ran; nothing was replaced")
    os.rename(tmp, dst)  # fails on a non-empty directory or a file that appears in between: never replaces data


def _exchange(tmp: Path, dst: Path, checked: os.stat_result) -> Path:
    """Swap the new checkpoint in; returns where the replaced one now is (to be deleted)."""
    if _renameat2(tmp, dst, _RENAME_EXCHANGE):
        if _same(tmp.lstat(), checked) and not_a_checkpoint(tmp) is None:
            return tmp
        _renameat2(tmp, dst, _RENAME_EXCHANGE)  # not what was checked: put it back
        raise DestinationError(f"{dst}: changed while the conversion ran; nothing was replaced")
    # No atomic exchange here: move the old one aside (same directory), verify it, rename the new one in.
    aside = Path(tempfile.mkdtemp(prefix=f".{dst.name}.easyquant-old-", dir=dst.parent))
    old = aside / dst.name
    try:
        os.replace(dst, old)
        if not (_same(old.lstat(), checked) and not_a_checkpoint(old) is None):
            raise DestinationError(f"{dst}: changed while the conversion ran; nothing was replaced")
        os.rename(tmp, dst)
    except BaseException:
        if old.exists() and not dst.exists():
            os.replace(old, dst)  # put it back where it was
        if not old.exists():
            aside.rmdir()
        raise
    return old


def _load_libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()
