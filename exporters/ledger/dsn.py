"""Redaction of database passwords: the one place that knows where a DSN hides a secret.

A PostgreSQL DSN carries its password in three forms, all handled by :func:`redact_dsn`:
the URL userinfo (``postgresql://user:pw@host/db``), a keyword/value DSN
(``host=h password=pw`` or ``password='p w'``) and a URL query parameter
(``?password=pw`` / ``&sslpassword=pw``). It works on any text, not only on a bare DSN,
because driver errors quote the connection string (psycopg's "invalid dsn: ..." does):
every log line, ``repr``, exception raised to a caller and CLI output that could carry a
ledger URL or a driver message goes through it (or through :func:`scrub_error`).
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

__all__ = ["MASK", "redact_dsn", "scrub_error"]

MASK = "***"

# scheme://user:password@ : the password is everything up to the last '@' of the authority.
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@?#]*:)(?P<pw>[^\s/?#]*)@")
# password=... as a query parameter or a keyword DSN entry (also sslpassword, passfile is
# a path, not a secret). A quoted keyword value may contain spaces and escaped quotes.
_KEYWORD = re.compile(
    r"(?P<head>\b(?:ssl)?password\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?|[^\s&;'\"]*)",
    re.IGNORECASE,
)


def redact_dsn(text: str) -> str:
    """``text`` with every DSN password replaced by ``***``; anything else is unchanged.

    Accepts a URL, a keyword DSN, or free text containing either (a driver error message).
    Never raises; ``None``-like input is returned as ``str(text)``.
    """
    if not isinstance(text, str):
        text = str(text)
    if "@" in text:
        text = _USERINFO.sub(lambda m: m["head"] + MASK + "@", text)
    if "assword" in text or "ASSWORD" in text:
        text = _KEYWORD.sub(lambda m: m["head"] + MASK, text)
    return text


def _password_of(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return unquote(parts.password) if parts.password else None


def scrub_error(message: object, url: str | None = None) -> str:
    """A driver/exception message safe to log or raise: :func:`redact_dsn`, and the literal
    password of ``url`` (when 4+ characters, so short ones do not blank unrelated text)
    removed wherever the driver echoed it in another form."""
    text = redact_dsn(str(message))
    for source in (url,) if url else ():
        secret = _password_of(source)
        if secret and len(secret) >= 4:
            text = text.replace(secret, MASK)
        for m in _KEYWORD.finditer(source):
            value = m["pw"].strip("'\"")
            if len(value) >= 4:
                text = text.replace(value, MASK)
    return text
