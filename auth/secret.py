"""The server secret that keys API-key digests: from the environment, else a 0600 file.

Keys are stored only as ``HMAC-SHA256(server_secret, key)``, so the key table alone (a
stolen backup, a read-only database user) cannot be used to check guesses offline. The
secret therefore lives outside the database: ``$PADDLE_METER_AUTH_SECRET`` (32+ characters,
the same on every worker, replica and CLI), else a file (``auth.secret_file``, default
``<data_dir>/auth.secret``) created on first use with 32 random bytes, mode 0600, and
refused when its mode lets group or others read it. The secret is never logged.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

__all__ = ["MIN_SECRET_CHARS", "SECRET_ENV", "load_server_secret"]

SECRET_ENV = "PADDLE_METER_AUTH_SECRET"
MIN_SECRET_CHARS = 32


def load_server_secret(secret_file: str | Path, *, create: bool) -> bytes:
    """The server secret: ``$PADDLE_METER_AUTH_SECRET`` when set (non-empty), else the file.

    ``create``: a missing file is created (0600, in a 0700 directory when that is missing
    too) holding 64 hex digits and a newline; otherwise a missing file raises
    FileNotFoundError. A file readable by group or others raises PermissionError; a
    secret shorter than 32 characters raises ValueError.
    """
    env = os.environ.get(SECRET_ENV, "").strip()
    if env:
        if len(env) < MIN_SECRET_CHARS:
            raise ValueError(
                f"{SECRET_ENV} must be at least {MIN_SECRET_CHARS} characters "
                f"(it has {len(env)}); e.g. the output of `openssl rand -hex 32`"
            )
        return env.encode()
    path = Path(secret_file)
    try:
        return _read(path)
    except FileNotFoundError:
        if not create:
            raise FileNotFoundError(
                f"no server secret at {path}: create a key with `paddle-meter keys create` "
                f"(which creates that file) or set {SECRET_ENV} (the same value everywhere)"
            ) from None
    _create(path)
    return _read(path)


def _read(path: Path) -> bytes:
    # fstat the opened file, not the name: the mode checked is the mode of what is read.
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PermissionError(f"the server secret {path} is not a regular file")
        if st.st_mode & 0o077:
            raise PermissionError(
                f"the server secret {path} is readable by others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}"
            )
        with os.fdopen(fd, "rb", closefd=False) as fh:
            text = fh.read().strip()
    finally:
        os.close(fd)
    if len(text) < MIN_SECRET_CHARS:
        raise ValueError(
            f"the server secret {path} holds fewer than {MIN_SECRET_CHARS} characters; "
            "remove it to have a new one made (every existing key then stops working)"
        )
    return text


def _create(path: Path) -> None:
    """Write a new secret to ``path`` unless another process just did.

    Written complete to a private temporary file and then hard-linked to its name, so a
    concurrent reader (another worker, the CLI) never sees a half-written secret, and of
    two racing creators exactly one wins (link fails on an existing name).
    """
    parent = path.parent
    if not parent.exists():
        os.makedirs(parent, mode=0o700, exist_ok=True)
    tmp = parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, (secrets.token_hex(32) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process created it first: use theirs
    except OSError:
        # A file system without hard links: create the name itself (O_EXCL: one winner).
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, tmp.read_bytes())
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    with contextlib.suppress(OSError):  # make the new name durable
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
