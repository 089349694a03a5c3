"""Atomic export outputs: a model file or directory appears complete, or not at all.

Every exporter writes into a temporary sibling of its output (same directory, so the
final rename stays on one filesystem and is atomic) and renames it into place only when
the export has finished. An exception or Ctrl-C anywhere before that removes the
temporary, so nothing half-written ever looks like a model. The free-space check lets an
export that cannot fit fail in a second instead of after minutes of work.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgespec.errors import UserError

_FILE_MODE, _DIR_MODE = 0o644, 0o755  # mkstemp/mkdtemp's owner-only modes would stick
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # the disk, a quota or a file-size limit


@contextmanager
def scratch_path(near: Path, *, directory: bool = False) -> Iterator[Path]:
    """A new empty temporary file (or directory) next to ``near``, removed on exit.

    The name starts with a dot, the output's name and this process's id, so a leftover
    of a killed process is recognisable and the next export next to it removes it; it is
    gone after the block whether the block succeeded, failed, or moved it elsewhere.
    """
    _remove_leftovers(near)
    prefix = f".{near.name}.{os.getpid()}."
    if directory:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=near.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=near.parent)
        os.close(fd)
        path = Path(name)
    try:
        yield path
    finally:
        _remove(path)


@contextmanager
def atomic_output(out: Path, *, force: bool, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``out`` into; rename it into place on success.

    An existing ``out`` is refused unless ``force``, and is replaced only once the new
    output is complete (a file by ``os.replace``; a directory is moved aside first).
    """
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with scratch_path(out, directory=directory) as tmp:
            yield tmp
            tmp.chmod(_DIR_MODE if directory else _FILE_MODE)
            _move_into_place(tmp, out)
    except OSError as e:
        if e.errno in _FULL:
            raise write_failed(out, e.strerror) from None
        if _about(e, out):
            raise UserError(f"cannot write {out}: {e.strerror} ({e.filename}); choose another "
                            "output path") from None
        raise


def write_failed(where: Path, reason: str) -> UserError:
    """The error for an output (or into a directory) whose writing failed: a full disk, a
    quota or a file-size limit (native writers, llama.cpp's and OpenVINO's, report only that
    their stream failed)."""
    return UserError(f"writing {where} failed: {reason}; nothing was written; free some space "
                     "or write the output elsewhere")


def _about(e: OSError, out: Path) -> bool:
    """Whether ``e`` is about the output's place (its directory, an ancestor, its temporary)
    rather than, say, the source being read."""
    if e.filename is None:
        return False
    where = Path(e.filename)
    return where == out or where in out.parents or where.parent == out.parent


def check_disk_space(directory: Path, need_bytes: int, what: str) -> None:
    """Refuse to start ``what`` when ``directory``'s filesystem has less than ``need_bytes``."""
    free = shutil.disk_usage(directory).free
    if free < need_bytes:
        raise UserError(
            f"not enough disk space in {directory} for {what}: it needs about "
            f"{need_bytes / 1e6:,.0f} MB and {free / 1e6:,.0f} MB are free; free some space "
            "or write the output elsewhere"
        )


def _move_into_place(tmp: Path, out: Path) -> None:
    if not (tmp.is_dir() or out.is_dir()):
        os.replace(tmp, out)
        return
    old = tmp.with_name(tmp.name + ".old")
    if out.exists():
        out.rename(old)  # moved aside, not deleted, until the new output is in place
    tmp.rename(out)
    _remove(old)


def _remove_leftovers(near: Path) -> None:
    """Temporaries next to ``near`` whose process is gone (SIGKILL, power loss)."""
    for path in near.parent.glob(f".{near.name}.*"):
        pid = path.name[len(near.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
