"""Who may change data on the dashboard: tokens, session cookies, CSRF and Origin checks.

A token is ``name:secret`` (a bare ``secret`` is named ``admin``). A person logs
in by pasting a secret; the session cookie then holds the token's name, a random
session id, when it was issued and when it ends, and an HMAC of all four under a
key derived from that token's secret alone, so sessions survive a restart and
end at once, everywhere, when the token is rotated or removed. Logging out
revokes the session id in the store (``_sessions``), so a copy of the cookie
stops working too. Every form carries a CSRF token, an HMAC of the session
cookie under the same key. Scripts send ``Authorization: Bearer <secret>`` instead (no
cookie, so no CSRF token is needed). Secrets are compared with
``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from starlette.requests import Request

__all__ = [
    "SESSION_COOKIE",
    "Auth",
    "Forbidden",
    "Identity",
    "Session",
    "parse_origin",
    "parse_tokens",
]

SESSION_COOKIE = "retrybus_session"
LOGIN_COOKIE = "retrybus_login"
DEFAULT_SESSION_MAX_AGE = 12 * 3600
_NAME = re.compile(r"^[A-Za-z0-9_.@+-]{1,64}$")
_SESSION_VERSION = "v2"  # v1 cookies (no session id, not revocable) are refused
_SESSION_LABEL = b"retrybus-dashboard session v1"
# a cookie issued up to this long "in the future" is accepted (clocks of two hosts differ)
CLOCK_SKEW = 60
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_LOGIN_LABEL = b"retrybus-dashboard login v1"

TokenSpec = str | Mapping[str, str] | Iterable[str] | None


class Forbidden(Exception):
    """A data-changing request that is refused (403), with the reason to show."""


@dataclass(frozen=True, slots=True)
class Session:
    """What a valid session cookie says: the token's name, the session's id, and
    when it was issued and ends (Unix seconds)."""

    name: str
    id: str
    issued: int
    expires: int


class RevocationCache(Protocol):
    """What ``Auth`` asks about revoked sessions without waiting (``_sessions.Revocations``)."""

    def known_revoked(self, session_id: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class Identity:
    """Who sent a request: a token's name, and how it was proven."""

    name: str
    via: str  # "session" or "bearer"
    session: str = ""  # the session cookie's value (the CSRF token derives from it)
    session_id: str = ""
    expires: int = 0  # when the session ends (Unix seconds; 0 for a bearer token)


def parse_tokens(spec: TokenSpec) -> dict[str, str]:
    """Tokens as ``{name: secret}`` from ``"alice:s3cret,bob:t0ken"`` (or a list of
    such entries, or a mapping). A bare secret is named ``admin``. Raises
    ``ValueError`` naming the entry (never its secret) when one is malformed."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        entries = [f"{name}:{secret}" for name, secret in spec.items()]
    elif isinstance(spec, str):
        entries = spec.split(",")
    else:
        entries = list(spec)
    tokens: dict[str, str] = {}
    for position, raw in enumerate(entries, start=1):
        if not isinstance(raw, str):
            raise TypeError(f"token entry {position} must be a string, got {type(raw).__name__}")
        entry = raw.strip()
        if not entry:
            continue
        name, colon, secret = entry.partition(":")
        if not colon:
            name, secret = "admin", entry
        name, secret = name.strip(), secret.strip()
        if not _NAME.match(name):
            raise ValueError(
                f"token entry {position}: the name {name!r} must be 1-64 letters, digits "
                "or _.@+- (write entries as name:secret)"
            )
        if not secret:
            raise ValueError(f"token entry {position} ({name!r}) has an empty secret")
        if name in tokens:
            raise ValueError(f"token entry {position}: the name {name!r} is given twice")
        tokens[name] = secret
    return tokens


class Auth:
    """Checks who a request comes from and whether it may change data."""

    def __init__(
        self,
        tokens: TokenSpec = None,
        *,
        session_max_age: int = DEFAULT_SESSION_MAX_AGE,
        trusted_origins: Iterable[str] = (),
        revocations: RevocationCache | None = None,
    ) -> None:
        self._tokens = parse_tokens(tokens)
        self._keys = {
            name: hmac.new(secret.encode(), _SESSION_LABEL, hashlib.sha256).digest()
            for name, secret in self._tokens.items()
        }
        joined = "\x1f".join(f"{n}\x1e{s}" for n, s in sorted(self._tokens.items()))
        self._login_key = hmac.new(joined.encode(), _LOGIN_LABEL, hashlib.sha256).digest()
        self.session_max_age = session_max_age
        if isinstance(trusted_origins, str):
            trusted_origins = [trusted_origins]
        self._trusted = {parse_origin(o, strict=True) for o in trusted_origins}
        self.revocations = revocations

    @property
    def read_only(self) -> bool:
        """True when no token is configured: nothing can be changed."""
        return not self._tokens

    # proving who one is -----------------------------------------------------

    def name_for_secret(self, secret: str) -> str | None:
        """The name of the token with this secret (every token is compared, in
        constant time each, so timing does not tell which one came close)."""
        found: str | None = None
        given = _digest(secret.strip())
        for name, known in self._tokens.items():
            if hmac.compare_digest(given, _digest(known)):
                found = name
        return found

    def name_for_login(self, pasted: str) -> str | None:
        """The token a person pasted into the log-in form: its secret, or the whole
        ``name:secret`` entry as it is written in ``RETRYBUS_DASHBOARD_TOKEN``."""
        found = self.name_for_secret(pasted)
        name, colon, secret = pasted.strip().partition(":")
        known = self._tokens.get(name) if colon else None
        if found is None and known is not None:
            found = name if hmac.compare_digest(_digest(secret.strip()), _digest(known)) else None
        return found

    def new_session(self, name: str, now: float | None = None) -> str:
        """A session cookie value for the token ``name``, with a new session id."""
        issued = int(time.time() if now is None else now)
        expires = issued + self.session_max_age
        session_id = secrets.token_urlsafe(16)
        body = f"{_SESSION_VERSION}:{name}:{session_id}:{issued}:{expires}"
        return f"{body}:{self._mac(name, body)}"

    def _mac(self, name: str, text: str) -> str:
        return hmac.new(self._keys[name], text.encode(), hashlib.sha256).hexdigest()

    def session(self, value: str, now: float | None = None) -> Session | None:
        """What a session cookie proves, or None (forged, expired, from an older
        release, or its token no longer configured or rotated). Revocation is
        not checked here."""
        parts = value.split(":")
        if len(parts) != 6 or parts[0] != _SESSION_VERSION or parts[1] not in self._keys:
            return None
        _, name, session_id, issued_text, expires_text, mac = parts
        body = value.rsplit(":", 1)[0]
        if not hmac.compare_digest(mac, self._mac(name, body)):
            return None
        try:
            issued, expires = int(issued_text), int(expires_text)
        except ValueError:
            return None
        moment = time.time() if now is None else now
        age = moment - issued
        # the cookie's own end bounds it (a revocation is kept until then); this
        # dashboard's session_max_age too, when it is shorter than the issuer's
        if not (-CLOCK_SKEW <= age <= self.session_max_age and moment < expires):
            return None
        return Session(name, session_id, issued, expires)

    def session_name(self, value: str, now: float | None = None) -> str | None:
        """The token name a session cookie proves (see ``session``), or None."""
        found = self.session(value, now)
        return None if found is None else found.name

    def identify(self, request: Request) -> Identity | None:
        """Who the request comes from: a bearer token, else a valid session cookie."""
        if self.read_only:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            name = self.name_for_secret(credentials)
            return None if name is None else Identity(name, "bearer")
        cookie = request.cookies.get(SESSION_COOKIE, "")
        found = self.session(cookie) if cookie else None
        if found is None:
            return None
        if self.revocations is not None and self.revocations.known_revoked(found.id):
            return None
        return Identity(found.name, "session", cookie, found.id, found.expires)

    # CSRF -------------------------------------------------------------------

    def csrf_token(self, identity: Identity | None) -> str:
        """The hidden form field every POST of this session must carry."""
        if identity is None or identity.via != "session":
            return ""
        return self._mac(identity.name, "csrf:" + identity.session)

    def login_nonce(self) -> str:
        return secrets.token_urlsafe(24)

    def login_csrf(self, nonce: str) -> str:
        """The login form's CSRF token: an HMAC of the nonce in its cookie."""
        return hmac.new(self._login_key, nonce.encode(), hashlib.sha256).hexdigest()

    # the checks every POST passes --------------------------------------------

    def check_origin(self, request: Request) -> None:
        """Refuse a request whose ``Origin`` (or, without one, ``Referer``) is another site."""
        origin = request.headers.get("origin")
        if origin is None:
            referer = request.headers.get("referer")
            if not referer:
                return
            origin = referer
        if origin == "null":
            raise Forbidden("refused: the request comes from an opaque origin")
        sender = parse_origin(origin)
        own = parse_origin(f"{request.url.scheme}://{request.headers.get('host', '')}")
        if sender != own and sender not in self._trusted:
            raise Forbidden(f"refused: the request comes from another origin ({origin})")

    def check_login_post(self, request: Request, form_csrf: str) -> None:
        """The checks of the login form (no session yet: its CSRF token derives
        from a nonce cookie set with the form)."""
        if self.read_only:
            raise Forbidden("read-only dashboard: no tokens are configured")
        self.check_origin(request)
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        if not nonce or not hmac.compare_digest(form_csrf, self.login_csrf(nonce)):
            raise Forbidden("refused: the login form expired or was not sent by this page")

    def check_sender(self, request: Request) -> None:
        """The checks a data-changing request passes before its body is read: the
        origin, and a session or bearer token (the CSRF token comes with the form)."""
        if self.read_only:
            raise Forbidden("read-only dashboard: no tokens are configured, nothing can be changed")
        self.check_origin(request)
        if self.identify(request) is None:
            if request.headers.get("authorization"):
                raise Forbidden("refused: the bearer token is not one of the configured tokens")
            raise Forbidden("log in with a token to change data")

    def check_post(self, request: Request, form_csrf: str | None) -> Identity:
        """The identity a data-changing request acts as; raises ``Forbidden``."""
        if self.read_only:
            raise Forbidden("read-only dashboard: no tokens are configured, nothing can be changed")
        self.check_origin(request)
        identity = self.identify(request)
        if identity is None:
            if request.headers.get("authorization"):
                raise Forbidden("refused: the bearer token is not one of the configured tokens")
            raise Forbidden("log in with a token to change data")
        if identity.via == "session" and not hmac.compare_digest(
            form_csrf or "", self.csrf_token(identity)
        ):
            raise Forbidden("refused: the form's CSRF token is missing or wrong (reload the page)")
        return identity


def _digest(secret: str) -> bytes:
    # compared as digests: equal lengths, so the comparison does not reveal the length
    return hashlib.sha256(secret.encode()).digest()


def parse_origin(origin: str, *, strict: bool = False) -> tuple[str, str]:
    """An origin (or a URL) as ``(scheme, host[:port])``, lower case, a default
    port left out: ``http://host`` and ``https://host`` differ. ``strict`` (a
    trusted origin given in the configuration) raises ``ValueError`` naming the
    value when it has no scheme or host."""
    parts = urlsplit(origin.strip())
    scheme, netloc = parts.scheme.lower(), parts.netloc.lower()
    host, colon, port = netloc.rpartition(":")
    if colon and "]" not in port and port == _DEFAULT_PORTS.get(scheme):
        netloc = host
    if strict and (scheme not in _DEFAULT_PORTS or not netloc):
        raise ValueError(
            f"trusted origin {origin!r} must be a scheme and a host, such as "
            "'https://ops.example.com'"
        )
    return scheme, netloc
