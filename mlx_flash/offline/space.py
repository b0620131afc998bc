"""Disk space for the offline writers (place, pull): checked up front, a full disk explained.

A write that hits ENOSPC says which file, how many bytes to free and on which mount point,
instead of a bare "No space left on device".
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


def mount_point(path: str | Path) -> Path:
    """The mount point of the file system that holds `path` (an existing file or dir)."""
    path = Path(path).resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def space_error(what: str, file: Path, need: int, fix: str, cause: OSError | None = None
                ) -> OSError:
    """OSError(ENOSPC) for `what` that needs `need` bytes free where `file` is written."""
    where = file.parent if not file.is_dir() else file
    while not where.exists() and where != where.parent:
        where = where.parent
    free, mount = shutil.disk_usage(where).free, mount_point(where)
    short = max(need - free, 1)
    how = f"writing {file} failed ({cause.strerror})" if cause is not None else \
        f"{file} would not fit"
    return OSError(errno.ENOSPC, f"{what}: {how}: it needs {need} bytes free on {mount} and "
                   f"{free} are free; free {short} bytes on {mount} and run it again. {fix}")


def check_free(what: str, file: Path, need: int, fix: str) -> None:
    """Raise space_error now when fewer than `need` bytes are free where `file` goes."""
    where = file if file.is_dir() else file.parent
    if shutil.disk_usage(where).free < need:
        raise space_error(what, file, need, fix)


def is_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
