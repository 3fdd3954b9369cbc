"""Writing output directories: who may be replaced, and a replace that survives a kill at every step.

Kills are injected, not timed: a forked child replaces one step function of `moeinfer.fsutil` by one
that ends the process with `os._exit` (no cleanup, no `finally`, like kill -9) before or after the real
step; the parent then checks what is on disk and runs the next write.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from moeinfer import fsutil
from moeinfer.fsutil import OutputDirError, check_output_dir, recover_dir, staged_dir

FILES = ("a.bin", "b.bin", "config.json")


def _write(dest: Path, version: str, *, atomic: bool = True) -> None:
    with staged_dir(dest, atomic=atomic) as tmp:
        for name in FILES:
            (tmp / name).write_text(f"{version}:{name}")


def _version(dest: Path) -> str | None:
    """'old' or 'new' when dest holds that complete output; None when missing or mixed."""
    if not dest.is_dir():
        return None
    found = {(dest / n).read_text().split(":")[0] if (dest / n).is_file() else None for n in FILES}
    return found.pop() if len(found) == 1 and sorted(p.name for p in dest.iterdir()) == sorted(FILES) else None


def _kill_at(dest: Path, step: str, when: str, *, atomic: bool) -> None:
    """Run `_write(dest, 'new')` in a child killed `when` ('before'/'after'/'during') `step`."""
    pid = os.fork()
    if pid == 0:  # child: never returns to pytest
        try:
            if step == "write":
                def dying_write(d, version, *, atomic):
                    with staged_dir(d, atomic=atomic) as tmp:
                        (tmp / FILES[0]).write_text(f"{version}:{FILES[0]}")
                        os._exit(9)
                dying_write(dest, "new", atomic=atomic)
            real = os.replace if step == "replace" else getattr(fsutil, step)
            count = {"n": 0}

            def hooked(*args, **kwargs):
                if when == "before":
                    os._exit(9)
                if when == "during":  # os.replace: die after the first of the two renames
                    count["n"] += 1
                    if count["n"] == 2:
                        os._exit(9)
                    return real(*args, **kwargs)
                real(*args, **kwargs)
                os._exit(9)

            if step == "replace":
                fsutil.os.replace = hooked  # type: ignore[attr-defined]
            else:
                setattr(fsutil, step, hooked)
            _write(dest, "new", atomic=atomic)
            os._exit(0)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, 9), status


# (step, when, what dest must hold right after the kill)
STEPS = [("write", "during", "old"), ("swap_in", "before", "old"), ("swap_in", "after", "new"),
         ("remove_old", "before", "new"), ("remove_old", "after", "new")]
CASES = ([pytest.param(*c, True, id=f"exchange-{c[0]}-{c[1]}") for c in STEPS]
         + [pytest.param(*c, False, id=f"two-renames-{c[0]}-{c[1]}") for c in STEPS]
         + [pytest.param("replace", "during", None, False, id="two-renames-between-the-renames")])


@pytest.mark.parametrize("step,when,expected,atomic", CASES)
def test_kill_at_each_step_keeps_old_or_new(tmp_path, step, when, expected, atomic):
    """Defect 6 (issue 14): a kill between the two renames left neither output, and kills left debris."""
    dest = tmp_path / "out"
    _write(dest, "old")
    _kill_at(dest, step, when, atomic=atomic)
    assert _version(dest) == expected, sorted(p.name for p in tmp_path.iterdir())
    if expected is None:  # between the fallback's two renames: the old output waits, complete, beside dest
        olds = [p for p in tmp_path.iterdir() if ".moeinfer-old-" in p.name]
        assert len(olds) == 1 and _version(olds[0]) == "old"
        assert recover_dir(dest) and _version(dest) == "old"  # what the next run does first
    # the next run cleans the dead writer's debris and writes the new output
    _write(dest, "newer", atomic=atomic)
    assert _version(dest) == "newer"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("atomic", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("step", ["swap_in", "publishable_"])
def test_exception_at_a_step_keeps_old_and_leaves_nothing(tmp_path, monkeypatch, step, atomic):
    dest = tmp_path / "out"
    _write(dest, "old")

    def boom(*a, **k):
        raise OSError("injected")

    monkeypatch.setattr(fsutil, step, boom)
    with pytest.raises(OSError, match="injected"):
        _write(dest, "new", atomic=atomic)
    assert _version(dest) == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_second_rename_puts_old_back(tmp_path, monkeypatch):
    dest = tmp_path / "out"
    _write(dest, "old")
    real = os.replace
    calls = []

    def second_fails(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError("injected")
        return real(a, b)

    monkeypatch.setattr(fsutil.os, "replace", second_fails)
    with pytest.raises(OSError, match="injected"):
        _write(dest, "new", atomic=False)
    assert _version(dest) == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_live_writers_temporaries_are_left_alone(tmp_path):
    dest = tmp_path / "out"
    _write(dest, "old")
    parent = os.getppid()  # alive: pytest's parent
    live = tmp_path / f".out.moeinfer-new-{parent}"
    live.mkdir()
    dead = tmp_path / ".out.moeinfer-new-999999999"  # beyond pid_max
    dead.mkdir()
    other = tmp_path / ".other.moeinfer-new-999999999"  # another directory's: not ours to judge
    other.mkdir()
    assert recover_dir(dest) == [dead]
    assert live.is_dir() and other.is_dir() and not dead.exists()


def test_older_moeinfer_debris_is_named(tmp_path, caplog):
    dest = tmp_path / "out"
    _write(dest, "old")
    (tmp_path / ".out.tmp-abcd1234").mkdir()
    (tmp_path / ".out.old-999999999").mkdir()
    with caplog.at_level("WARNING"):
        recover_dir(dest)
    assert ".out.tmp-abcd1234" in caplog.text
    assert not (tmp_path / ".out.old-999999999").exists()


def test_published_directory_has_usual_permissions(tmp_path):
    dest = tmp_path / "out"
    _write(dest, "new")
    mask = fsutil.umask()
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o777 & ~mask
    assert {stat.S_IMODE(os.stat(dest / n).st_mode) for n in FILES} == {0o666 & ~mask}


def _is_ckpt(p: Path) -> bool:
    return (p / "config.json").is_file()


def test_check_output_dir_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert check_output_dir("empty", overwrite=False, holds_output=_is_ckpt) == tmp_path / "empty"
    assert check_output_dir("missing/deeper", overwrite=False, holds_output=_is_ckpt) == tmp_path / "missing/deeper"
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    with pytest.raises(OutputDirError, match="already holds a checkpoint"):
        check_output_dir("ckpt", overwrite=False, holds_output=_is_ckpt)
    assert check_output_dir("ckpt", overwrite=True, holds_output=_is_ckpt) == tmp_path / "ckpt"
    (tmp_path / "link").symlink_to(tmp_path / "ckpt")  # the directory written is the link's target
    assert check_output_dir("link", overwrite=True, holds_output=_is_ckpt) == tmp_path / "ckpt"
    with pytest.raises(OutputDirError, match="an input of this run"):
        check_output_dir("ckpt", overwrite=False, holds_output=_is_ckpt, protect=[tmp_path / "ckpt" / "x"])
    assert check_output_dir("ckpt", overwrite=True, holds_output=_is_ckpt, protect=[tmp_path / "ckpt"])
    with pytest.raises(OutputDirError, match="current directory"):
        check_output_dir(".", overwrite=False, holds_output=_is_ckpt)
