"""Launching the page: one analysis at a time through a bounded queue, behind the login
and upload guards.

- **One analysis at a time, through a bounded queue.** The direct REST route
  (``/gradio_api/run/predict``), which would skip the queue and decode uploads in
  parallel, is closed (``api_open=False``: it answers 404); the page and ``gradio_client``
  use the queue, which runs ``concurrency_limit=1`` analysis per process and refuses
  events beyond ``max_queue`` waiting ones ("Queue is full").
- **Per-client limits** (:class:`ClientLimits`): failed logins (``login``) and uploads in
  flight (``uploads``), per client address.
- **Memory levels off under load.** Gradio keeps ``STATE_SESSIONS`` browser sessions (its
  default, 10 000, let memory climb for hours), each holding the slider's state at the
  model's input size (``handlers``); ``python -m braintumor.serving.app`` also caps
  glibc's malloc arenas (``memory``). Measured with ``bench/app_load.py --rounds 5``.

Nothing is fetched from the internet: analytics and the version check are off, the theme's
fonts are served by the app itself, and no share link is made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from braintumor.serving.app.login import (
    DEFAULT_MAX_FAILURES,
    DEFAULT_WINDOW_S,
    LoginThrottle,
    LoginThrottleMiddleware,
)
from braintumor.serving.app.page import Page
from braintumor.serving.app.uploads import (
    DEFAULT_MAX_FILES,
    UploadGuard,
    UploadQuota,
    UploadRefs,
)

# Browser sessions whose state gradio keeps (each: a copy of the page's configuration, about
# 20 kB, and the slider's state); the oldest beyond this are dropped, and moving the slider
# of a dropped session blanks its overlay until the next upload. Gradio's default, 10 000,
# let a loaded app grow by 0.2 to 0.4 MB a session (the state was kept at display size).
STATE_SESSIONS = 500


@dataclass(frozen=True)
class ClientLimits:
    """What one client address may do: ``login_failures`` failed logins within
    ``login_window_s`` seconds, and ``upload_files`` uploads holding at most
    ``upload_bytes`` bytes waiting for analysis at once (``None``: twice the transport
    limit, i.e. two uploads of the largest size)."""

    login_failures: int = DEFAULT_MAX_FAILURES
    login_window_s: float = DEFAULT_WINDOW_S
    upload_files: int = DEFAULT_MAX_FILES
    upload_bytes: int | None = None


def serve(
    page: Page,
    *,
    host: str,
    port: int,
    logins: Callable[[str, str], bool] | None,
    max_queue: int,
    max_file_size: int,
    limits: ClientLimits = ClientLimits(),
) -> str:
    """Queue and launch ``page`` in a server thread; returns its local URL.

    The direct REST route is closed (``api_open=False``), so every analysis goes through
    the queue: one at a time (``concurrency_limit=1``), at most ``max_queue`` waiting.
    ``logins``: the ``auth`` check (``login.Logins``), or ``None`` for no login.
    """
    from starlette.middleware import Middleware

    quota = UploadQuota(limits.upload_files, limits.upload_bytes or 2 * max_file_size)
    refs = UploadRefs()
    page.handlers.busy = refs.busy
    guard = Middleware(UploadGuard, quota=quota, refs=refs, forget=page.handlers.forget)
    middleware = [guard]
    if logins is not None:
        throttle = LoginThrottle(limits.login_failures, limits.login_window_s)
        middleware.append(Middleware(LoginThrottleMiddleware, throttle=throttle))
    page.blocks.queue(api_open=False, max_size=max_queue, default_concurrency_limit=1)
    _, local_url, _ = page.blocks.launch(
        server_name=host,
        server_port=port,
        auth=logins,
        auth_message="Log in to use the brain tumour MRI classifier." if logins else None,
        share=False,
        prevent_thread_lock=True,
        quiet=True,
        ssr_mode=False,
        show_error=False,
        mcp_server=False,
        # Gradio 6 keeps every run (inputs and outputs) in the browser by default and
        # offers to sync them to a Hugging Face bucket: not for medical images.
        run_history=False,
        footer_links=["api", "settings"],
        # The transport limit; files between the two limits get the app's own message.
        max_file_size=max_file_size,
        state_session_capacity=STATE_SESSIONS,
        app_kwargs={"middleware": middleware},
    )
    return local_url
