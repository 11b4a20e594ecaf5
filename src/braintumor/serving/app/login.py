"""Who may use the app: the login file, the refusal to bind beyond loopback without one,
and the throttle that makes guessing passwords slow.

- **A login beyond loopback.** Binding any address that is not loopback is refused unless
  ``--auth-file`` (or ``$BRAINTUMOR_APP_AUTH_FILE``) names a file of ``user:password``
  lines; every route then needs a login (gradio's ``auth``). The file must not be readable
  or writable by group or others (``chmod 600``): it holds passwords in clear. Plain
  HTTP: put a TLS proxy in front when the network is not trusted.
- **Failed logins are throttled per client address.** After ``max_failures`` failed
  logins within ``window_s`` seconds, that address's logins are refused with HTTP 429
  (``Retry-After``) without being checked, until its oldest failure in the window ages
  out; a login under way counts against the allowance, so a burst of parallel guesses
  gets no more checks than a sequence. Each failure and each lockout is logged with the
  address, never with the password or the user name typed (it may be a password).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import stat
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from braintumor.serving.app.asgi import (
    ASGIApp,
    Receive,
    ResponseRecorder,
    Scope,
    Send,
    client_address,
    is_post,
)
from braintumor.serving.app.asgi import refuse as refuse_request
from braintumor.serving.predictor import SetupError

LOGGER = logging.getLogger(__name__)

AUTH_ENV = "BRAINTUMOR_APP_AUTH_FILE"
# Permission bits an auth file must not have: read or write for group or others.
SHARED_BITS = stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH
DEFAULT_MAX_FAILURES = 5
DEFAULT_WINDOW_S = 60.0
# Addresses remembered at most (the oldest forgotten first), so a flood of addresses
# cannot grow the throttle without bound.
MAX_CLIENTS = 10_000


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def read_auth_file(path: Path) -> list[tuple[str, str]]:
    """The ``user:password`` lines of ``path`` (blank and ``#`` lines skipped). A file,
    not an argument: command lines are visible to every user of the machine; and a file
    only its owner may read or change (refused otherwise, with its mode)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & SHARED_BITS:
            raise SetupError(
                f"auth file {path}: mode {mode:04o} lets group or others read or change it "
                f"(run chmod 600 {path})"
            )
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SetupError(f"auth file {path}: cannot read it ({error})") from None
    users = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, separator, password = line.partition(":")
        if not separator or not user.strip() or not password:
            raise SetupError(f"auth file {path}: line {number}: expected user:password")
        users.append((user.strip(), password))
    if not users:
        raise SetupError(f"auth file {path}: no user:password line")
    return users


class Logins:
    """Gradio's ``auth`` callable: whether a user name and password match a line of the
    auth file, compared in constant time."""

    def __init__(self, users: Sequence[tuple[str, str]]) -> None:
        self._passwords = {user: password.encode() for user, password in users}

    def __call__(self, username: str, password: str) -> bool:
        expected = self._passwords.get(username)
        # Compared even for an unknown user, so timing does not tell users apart.
        matches = hmac.compare_digest(password.encode(), expected or b"\0")
        return expected is not None and matches


def resolve_auth(host: str, auth_file: Path | None) -> Logins | None:
    """The logins to require: those of ``auth_file``; none on loopback without one; a
    refusal for any other address without one (a page of medical images on a network)."""
    if auth_file is not None:
        return Logins(read_auth_file(auth_file))
    if is_loopback(host):
        return None
    raise SetupError(
        f"--host {host}: not a loopback address and no login set: pass --auth-file FILE "
        f"(lines user:password) or set {AUTH_ENV}"
    )


@dataclass
class _Client:
    failures: deque[float] = field(default_factory=deque)
    checking: int = 0  # logins admitted and not yet answered
    refused: int = 0  # logins refused since the last admitted one


class LoginThrottle:
    """Failed logins per client address within a sliding window (thread-safe; the clock
    is a parameter so the arithmetic can be tested without waiting)."""

    def __init__(
        self,
        max_failures: int = DEFAULT_MAX_FAILURES,
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_failures < 1 or window_s <= 0:
            raise ValueError(f"login throttle: {max_failures} failures in {window_s} s")
        self.max_failures = max_failures
        self.window_s = window_s
        self.clock = clock
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._lock = threading.Lock()

    def admit(self, client: str) -> float | None:
        """``None`` when a login from ``client`` may be checked now (call :meth:`settle`
        with its outcome), else the seconds until it may try again."""
        with self._lock:
            now = self.clock()
            state = self._clients.setdefault(client, _Client())
            self._clients.move_to_end(client)
            while state.failures and state.failures[0] <= now - self.window_s:
                state.failures.popleft()
            if len(state.failures) + state.checking >= self.max_failures:
                state.refused += 1
                if state.refused == 1:
                    LOGGER.warning(
                        "login: %s refused for now: %d failed logins within %.0f s",
                        client,
                        len(state.failures),
                        self.window_s,
                    )
                oldest = state.failures[0] if state.failures else now
                return max(oldest + self.window_s - now, 0.001)
            if state.refused:
                LOGGER.info("login: %s may try again (%d refused meanwhile)", client, state.refused)
                state.refused = 0
            state.checking += 1
            self._forget_oldest()
            return None

    def settle(self, client: str, succeeded: bool | None) -> None:
        """The outcome of an admitted login: ``True`` clears the client's failures,
        ``False`` records one, ``None`` (the request was malformed) neither."""
        with self._lock:
            state = self._clients.setdefault(client, _Client())
            state.checking = max(state.checking - 1, 0)
            if succeeded:
                state.failures.clear()
            elif succeeded is False:
                state.failures.append(self.clock())
                LOGGER.warning(
                    "login failed from %s (%d of %d within %.0f s)",
                    client,
                    len(state.failures),
                    self.max_failures,
                    self.window_s,
                )

    def _forget_oldest(self) -> None:
        while len(self._clients) > MAX_CLIENTS:
            self._clients.popitem(last=False)


class LoginThrottleMiddleware:
    """Applies a :class:`LoginThrottle` to gradio's ``POST /login``: refused logins never
    reach gradio's password check; the answer of an admitted one (200: accepted, 400:
    wrong credentials) settles it."""

    def __init__(self, app: ASGIApp, throttle: LoginThrottle) -> None:
        self.app = app
        self.throttle = throttle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_post(scope, "/login"):
            await self.app(scope, receive, send)
            return
        client = client_address(scope)
        wait_s = self.throttle.admit(client)
        if wait_s is not None:
            seconds = math.ceil(wait_s)
            message = f"Too many failed logins from your address; try again in {seconds} s."
            await refuse_request(send, 429, message, retry_after_s=seconds)
            return
        response = ResponseRecorder(send)
        try:
            await self.app(scope, receive, response)
        finally:
            status = response.status
            outcome = {200: True, 400: False}.get(status) if status is not None else None
            self.throttle.settle(client, outcome)
