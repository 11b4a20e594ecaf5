"""Credentials out of everything the package prints, logs or writes.

Tracking, registry and artifact URIs often carry a password (``http://user:pw@host``,
``postgresql://user:pw@db``, ``?token=...``), and MLflow's own errors quote the URI they
failed on. Pure functions without MLflow, so serving and acquire use them without paying
MLflow's import.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

REDACTED = "***"
SECRET_WORDS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "token",
        "secret",
        "key",
        "apikey",
        "credential",
        "credentials",
        "auth",
        "authorization",
    }
)
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{},]+")


def is_secret_key(key: str) -> bool:
    """Whether a parameter or query key names a secret (``db.password``, ``api_key``...).

    Matched by whole words of the key, so ``tokenizer`` or ``monkey`` are not secrets."""
    words = re.split(r"[^a-z0-9]+", key.lower())
    return any(word in SECRET_WORDS for word in words) or "apikey" in key.lower()


def redact_uri(uri: str) -> str:
    """``uri`` with its credentials replaced by ``***``: the user-info part
    (``http://user:pw@host`` -> ``http://***@host``) and the values of secret-named query
    keys (``?token=...``). Every URI the package prints, logs or writes goes through this,
    because tracking and registry URIs often carry a password."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:  # not parseable as a URI (e.g. a bad IPv6 host): hide it all
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        if any(is_secret_key(key) for key, _ in pairs):
            query = "&".join(
                f"{key}={REDACTED if is_secret_key(key) else value}" for key, value in pairs
            )
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` (an error message, a log line) with every URI in it passed through
    ``redact_uri``; MLflow's own errors quote the tracking URI they failed on."""
    return _URI_IN_TEXT.sub(lambda match: redact_uri(match.group(0)), text)


def redact_params(flat: dict[str, Any]) -> dict[str, str]:
    """Parameters as logged to MLflow: secret-named keys get ``***``, and credentials in
    URIs are stripped from every value (runs are readable by everyone with the UI)."""
    return {
        key: REDACTED if is_secret_key(key) else redact_text(str(value))
        for key, value in flat.items()
    }


ONE_LINE_LIMIT = 400


def one_line(error: BaseException, limit: int = ONE_LINE_LIMIT) -> str:
    """An exception's message as one printable line, credentials stripped: library
    messages span several lines and quote the URIs they failed on. Capped at ``limit``
    characters, so that a message built from hostile input cannot flood a terminal or a
    log; the type's name when the message is empty."""
    text = redact_text(" ".join(str(error).split())) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
