"""Parsing store URLs and keeping passwords out of messages."""

from __future__ import annotations

import re
from urllib.parse import SplitResult, urlsplit

_USERINFO_PASSWORD = re.compile(r"(?P<head>://[^:@/?#\[\]]*):[^/?#]*@")
_QUERY_SECRET = re.compile(r"(?P<head>[?&](?:password|pass|pwd)=)[^&#]*", re.IGNORECASE)


def redact(url: str) -> str:
    """``url`` with any password (in the user info or a ``password=`` option)
    replaced by ``***``."""
    url = _QUERY_SECRET.sub(r"\g<head>***", url)
    try:
        parts = urlsplit(url)
    except ValueError:  # unparseable (an unclosed IPv6 bracket): mask by pattern
        return _USERINFO_PASSWORD.sub(r"\g<head>:***@", url, count=1)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]  # as written: the port may be malformed
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def split(url: str) -> SplitResult:
    """``urlsplit`` with a ``ValueError`` that names the URL."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"a store URL must be a non-empty string, got {url!r}")
    try:
        parts = urlsplit(url)
        if "," not in parts.netloc:  # several hosts (a MongoDB replica set): the driver checks
            parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as exc:
        raise ValueError(f"malformed store URL {redact(url)!r}: {exc}") from None
    if not parts.scheme or "://" not in url:
        raise ValueError(
            f"malformed store URL {redact(url)!r}: expected scheme://…, "
            "for example sqlite:///retrybus.db or memory://"
        )
    return parts
