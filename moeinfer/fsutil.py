"""Writing files and directories atomically, with the permissions a user expects, never over a user's data.

Temporary files and folders (mkstemp, mkdtemp, and safetensors' writer) are created private (0600 /
0700); what we publish by renaming them must get the usual permissions of the process's umask.
Directories (checkpoints) are written through `check_output_dir` (may we write there?) and `staged_dir`
(write beside, swap in, delete the old), so an existing directory is never silently deleted and a killed
writer leaves the old or the new output, never neither. Scratch folders the library makes for itself
(`scratch_dir`: an expert store when the caller named no folder) are deleted when their owner closes
and, at the latest, when the process exits.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import sys
import tempfile
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def umask() -> int:
    """The process umask, read from /proc (no race) where possible."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # fallback: read by setting (racy with other threads, but rare)
    os.umask(mask)
    return mask


def publishable_(path: str | os.PathLike[str]) -> None:
    """chmod a file (0666 & ~umask) or a folder and everything in it (0777 / 0666 & ~umask)."""
    mask = umask()
    p = Path(path)
    if p.is_dir():
        os.chmod(p, 0o777 & ~mask)
        for child in p.rglob("*"):
            os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~mask)
    else:
        os.chmod(p, 0o666 & ~mask)


def scratch_dir(prefix: str) -> str:
    """A new private temporary folder the library owns: removed when the process exits (and earlier by its
    owner, `remove_scratch`)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def remove_scratch(path: str | os.PathLike[str]) -> None:
    """Remove a `scratch_dir` folder now (its files too)."""
    shutil.rmtree(path, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike[str], text: str | bytes) -> Path:
    """Write `text` (str or bytes) to `path` through a temp file in the same folder, fsync and a rename;
    usual permissions."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        publishable_(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- Output directories: may we write here, and replacing one without ever losing both -------------

class OutputDirError(ValueError):
    """moeinfer was asked to write a directory where that would destroy something it was not asked to."""


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_dir(path: str | os.PathLike[str], *, overwrite: bool, holds_output: Callable[[Path], bool],
                     what: str = "checkpoint", protect: Iterable[str | os.PathLike[str] | None] = ()) -> Path:
    """May a `what` directory be written at `path`? Returns its absolute path, or raises OutputDirError.

    The one rule every writer of a directory follows (as `git clone` and `save_pretrained` users expect):
    1. a missing or empty directory may be written;
    2. a path that is a file, or a non-empty directory that does not hold this kind of output
       (`holds_output(dir)` is false), is never replaced, whatever `overwrite` says;
    3. a directory that holds such output is replaced only with `overwrite`;
    4. the current directory (or one of its parents) and the directories in `protect` (such as the source
       checkpoint) and their parents are refused unless `overwrite` is given.
    Symlinks are resolved first, so the rules apply to the directory actually written.
    """
    dest = Path(os.path.abspath(os.fspath(path)))
    real = dest.resolve()
    if real.exists() and not real.is_dir():
        raise OutputDirError(f"{dest} exists and is not a directory: give a directory path for the {what}")
    guarded = [Path.cwd().resolve()] + [Path(p).resolve() for p in protect if p is not None]
    if not overwrite:
        for g in guarded:
            if _is_within(g, real):
                kind = "the current directory" if g == guarded[0] else f"{g}, an input of this run"
                rel = "is" if g == real else "contains"
                raise OutputDirError(f"{dest} {rel} {kind}; writing the {what} there would replace it "
                                     f"(pass --overwrite / overwrite=True if that is what you want)")
    if real.is_dir() and any(real.iterdir()):
        if not holds_output(real):
            raise OutputDirError(f"{dest} is not empty and does not hold a {what}; refusing to replace it "
                                 f"(choose a new or empty directory)")
        if not overwrite:
            raise OutputDirError(f"{dest} already holds a {what}; pass --overwrite / overwrite=True to replace it")
    return real


# Temporaries of a directory being written live beside it, named after it and the writing process, so that a
# later run can tell its own family's debris (a dead writer's) from another live writer's.
_TEMP = re.compile(r"^\.(?P<name>.+)\.moeinfer-(?P<kind>new|old)-(?P<pid>\d+)$")
_LEGACY_OLD = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")  # what moeinfer <= 0.x left behind
_LEGACY_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-[A-Za-z0-9_]{8}$")


def _temp_name(dest: Path, kind: str) -> str:
    return f".{dest.name}.moeinfer-{kind}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_temps(dest: Path) -> list[tuple[Path, str]]:
    out = []
    try:
        siblings = list(dest.parent.iterdir())
    except OSError:
        return []
    for p in siblings:
        m = _TEMP.match(p.name) or _LEGACY_OLD.match(p.name)
        if m and m["name"] == dest.name and not _pid_alive(int(m["pid"])):
            out.append((p, m.groupdict().get("kind") or "old"))
    return out


def _legacy_temps(dest: Path) -> list[Path]:
    try:
        return [p for p in dest.parent.iterdir() if (m := _LEGACY_TMP.match(p.name)) and m["name"] == dest.name]
    except OSError:
        return []


def recover_dir(dest: str | os.PathLike[str]) -> list[Path]:
    """Clean up what killed writers of `dest` left beside it; returns the paths removed.

    A writer killed between the two renames of the non-atomic fallback left `dest` missing and the old
    output in `.NAME.moeinfer-old-PID`: that is renamed back first. Then every temporary of a dead writer
    of `dest` is deleted (a live writer's are left alone). A temporary that cannot be removed is named in
    a warning, so the user knows where the bytes are.
    """
    dest = Path(dest)
    stale = _stale_temps(dest)
    if not os.path.lexists(dest):
        olds = [p for p, kind in stale if kind == "old"]
        if olds:
            newest = max(olds, key=lambda p: p.stat().st_mtime)
            os.replace(newest, dest)
            stale = [(p, k) for p, k in stale if p != newest]
    unknown = _legacy_temps(dest)  # no pid in the name: maybe a live writer's, so only named
    if unknown:
        log.warning(f"{', '.join(map(str, unknown))}: temporary directories of an older moeinfer writing {dest}; "
                      "delete them by hand if no moeinfer is writing there")
    removed = []
    for p, _ in stale:
        shutil.rmtree(p, ignore_errors=True)
        if os.path.lexists(p):
            log.warning(f"could not remove {p}, left by a killed moeinfer writer of {dest}; delete it by hand")
        else:
            removed.append(p)
    return removed


_RENAME_EXCHANGE = 2
_exchange_fn: Callable[[bytes, bytes], int] | None = None


def _renameat2() -> Callable[[bytes, bytes], int] | None:
    """Linux renameat2(RENAME_EXCHANGE) through libc, or None where the platform has none."""
    global _exchange_fn
    if _exchange_fn is None and sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.renameat2
        except (OSError, AttributeError):
            return None
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        at_fdcwd = -100

        def exchange(a: bytes, b: bytes) -> int:
            if fn(at_fdcwd, a, at_fdcwd, b, _RENAME_EXCHANGE) == 0:
                return 0
            return ctypes.get_errno()

        _exchange_fn = exchange
    return _exchange_fn


def exchange_dirs(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where not supported."""
    fn = _renameat2()
    if fn is None:
        return False
    err = fn(os.fsencode(a), os.fsencode(b))
    if err == 0:
        return True
    import errno

    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # the filesystem or kernel does not support it: use the two-rename fallback
    raise OSError(err, os.strerror(err), str(b))


def swap_in(new: Path, dest: Path, *, atomic: bool = True) -> Path | None:
    """Put directory `new` at `dest`; returns where the old `dest` now is (to delete), or None.

    With `atomic` (and a filesystem that supports it) one renameat2 exchange: at every instant `dest` is
    the old or the new output. Otherwise two renames (dest -> .old, new -> dest); a kill between them
    leaves the old output in `.NAME.moeinfer-old-PID`, which `recover_dir` renames back on the next run.
    """
    if not os.path.lexists(dest) or (dest.is_dir() and not any(dest.iterdir())):
        os.replace(new, dest)  # rename(2) replaces an empty directory atomically
        return None
    if atomic and exchange_dirs(new, dest):
        return new  # `new` now names the old output
    old = dest.with_name(_temp_name(dest, "old"))
    os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    return old


def remove_old(old: Path) -> None:
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(dest: str | os.PathLike[str], *, atomic: bool = True) -> Iterator[Path]:
    """Write a directory crash-safely: yields an empty temporary beside `dest`; on success it replaces `dest`.

    Steps (each a function a test can interrupt): 1. `recover_dir` cleans up killed writers' debris;
    2. the caller writes into `.NAME.moeinfer-new-PID`; 3. `swap_in` puts it at `dest`; 4. `remove_old`
    deletes the previous output. An exception in 2 or 3 removes the temporary and leaves `dest` as it was;
    a kill leaves `dest` old or new (or, with the fallback, restorable) plus debris the next run removes.
    Callers decide first whether `dest` may be replaced (`check_output_dir`).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(dest)
    tmp = dest.with_name(_temp_name(dest, "new"))
    if os.path.lexists(tmp):  # our own pid's leftover (a failed earlier call in this process)
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        publishable_(tmp)  # mkdir/mkstemp and safetensors create private (0700/0600) entries
        old = swap_in(tmp, dest, atomic=atomic)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        remove_old(old)
