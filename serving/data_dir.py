"""The server's data dir (ledger, spool, state): created private, refused when it is not.

The ledger and its spool hold every customer's usage, so the directory is the first line
of privacy: it must be 0700. :func:`prepare_data_dir` is called once at server start,
before anything is written there.

Policy for an existing directory with group/other permission bits: when this process's
user owns it, the bits are removed (chmod 0700) and a WARNING names the old mode, so an
upgrade from a version that created it 0755 just works; when someone else owns it we
cannot fix it and must not trust it, so :class:`DataDirError` is raised with the path,
its mode, its owner and what to do.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

__all__ = ["DataDirError", "prepare_data_dir"]

log = logging.getLogger(__name__)


class DataDirError(ValueError):
    """The data dir cannot be made private (not a directory, or loose and not ours)."""


def prepare_data_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` mode 0700 (parents as needed), or make an existing one 0700.

    Returns the absolute path. Raises DataDirError when ``path`` is not a directory or is
    readable/writable by group or others and owned by another user; OSError when it
    cannot be created. Blocks briefly (filesystem calls only).
    """
    target = Path(path).expanduser().absolute()
    try:
        target.mkdir(parents=True, mode=0o700)
        created = True
    except FileExistsError:
        created = False
    st = os.stat(target)
    if not stat.S_ISDIR(st.st_mode):
        raise DataDirError(f"data dir {target} exists and is not a directory")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077 == 0 and mode & 0o700 == 0o700:
        return target
    if st.st_uid != os.geteuid():
        raise DataDirError(
            f"data dir {target} has mode {mode:04o} (group/other access) and belongs to "
            f"uid {st.st_uid}, not to this user (uid {os.geteuid()}); it holds the bill "
            f"ledger, so it must be private: run `chmod 700 {target}` as its owner, or "
            "configure server.data_dir to a directory of your own"
        )
    os.chmod(target, 0o700)
    if not created:  # mkdir's mode is cut by the umask; fixing our own new dir is routine
        log.warning(
            "data dir had loose permissions; tightened to 0700",
            extra={"path": str(target), "old_mode": f"{mode:04o}"},
        )
    return target
