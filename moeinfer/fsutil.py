"""Writing files atomically with the permissions a user expects.

Temporary files and folders (mkstemp, mkdtemp, and safetensors' writer) are created private (0600 /
0700); what we publish by renaming them must get the usual permissions of the process's umask.
"""

from __future__ import annotations

import os
from pathlib import Path


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
