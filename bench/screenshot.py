"""A screenshot of the real app answering a real slice: class, confidence and map.

Usage (from the repository root; `make screenshot [MODEL=...] [OUT=...]` runs the same)::

    nice -n 10 .venv/bin/python bench/screenshot.py --model models/bundle \\
        [--image ../shared/datasets/msoud/Testing/meningioma/Te-me_0016.jpg] \\
        [--out figures/app_screenshot.png] [--opacity 0.4]

Starts ``python -m braintumor.serving.app`` on a free loopback port with the bundle
(``app_load.start_app``: its own temporary folder, ready when its output says so), opens
the page in Debian's Chromium driven by Playwright (headless, the test suite's flags;
never ``playwright install``: the browser is the system's), blocks every request that is
not to the app, uploads the image, waits until the page shows the predicted class, the
four confidences and the map overlay (its image loaded), sets the overlay's opacity, and
saves a full-page PNG atomically. Prints what the page showed. A refused upload or an
answer that never comes is a one-line error (exit 1), with no screenshot written.

The PNG is for the README, reports and reviews; images are never committed
(``figures/`` is ignored).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from app_load import start_app  # bench/app_load.py, beside this script
from braintumor.core.files import atomic_path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DEFAULT_IMAGE = Path("msoud/Testing/meningioma/Te-me_0016.jpg")  # under the mirror
TIMEOUT_MS = 120_000


class ScreenshotError(RuntimeError):
    """The app did not show an answer (refused the image, or none came in time)."""


def _default_image() -> Path:
    mirror = os.environ.get("BRAINTUMOR_MIRROR") or REPO.parent / "shared" / "datasets"
    return Path(mirror) / DEFAULT_IMAGE


def _message(page: Any) -> str:
    return page.locator("#message textarea").input_value()


def _wait_for_answer(page: Any, name: str) -> str:
    """The message box's text once the analysis of ``name`` ended (analysed or refused)."""
    page.wait_for_function(
        """(name) => {
            const box = document.querySelector('#message textarea');
            return box !== null && (box.value.startsWith('Analysed ' + name)
                || box.value.startsWith('Cannot analyse'));
        }""",
        arg=name,
        timeout=TIMEOUT_MS,
    )
    return _message(page)


def _wait_for_image(page: Any, elem_id: str, old: str | None = None) -> str:
    """The source of ``#elem_id img`` once loaded (and, given ``old``, once changed)."""
    page.wait_for_function(
        """([id, old]) => { const i = document.querySelector('#' + id + ' img');
            return i !== null && i.complete && i.naturalWidth > 0
                && (old === null || i.getAttribute('src') !== old); }""",
        arg=[elem_id, old],
        timeout=TIMEOUT_MS,
    )
    return page.locator(f"#{elem_id} img").get_attribute("src")


def capture(url: str, image: Path, out: Path, opacity: float) -> dict[str, Any]:
    """Drive the page at ``url``: upload ``image``, wait for the class, the confidences and
    the map, set the opacity, save ``out``; returns what the page showed."""
    from playwright.sync_api import sync_playwright

    base = url.rstrip("/")
    outside: list[str] = []

    def only_the_app(route: Any) -> None:
        if route.request.url.startswith(base):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.route("**/*", only_the_app)
            page.goto(base + "/", timeout=TIMEOUT_MS)
            file_input = page.locator("#upload input[type=file]")
            file_input.wait_for(state="attached", timeout=TIMEOUT_MS)
            file_input.set_input_files(str(image))
            message = _wait_for_answer(page, image.name)
            if not message.startswith("Analysed"):
                raise ScreenshotError(f"{image}: the app refused it: {message}")
            page.locator("#probabilities meter").nth(3).wait_for(timeout=TIMEOUT_MS)
            _wait_for_image(page, "slice")
            overlay = _wait_for_image(page, "overlay")
            number = page.locator("#opacity input[type=number]")
            if abs(float(number.input_value()) - opacity) > 1e-6:
                number.fill(str(opacity))
                number.press("Enter")
                _wait_for_image(page, "overlay", overlay)
            confidences = page.locator("#probabilities meter").evaluate_all(
                "ms => ms.map(m => [m.getAttribute('aria-label'), m.getAttribute('value')])"
            )
            predicted = page.locator("#predicted input, #predicted textarea").first.input_value()
            with atomic_path(out) as temporary:
                page.screenshot(path=str(temporary), full_page=True, type="png")
        finally:
            browser.close()
    return {
        "message": message,
        "predicted": predicted,
        "confidences": {name: float(value) for name, value in confidences},
        "blocked_outside_requests": outside,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a bundle folder")
    parser.add_argument("--image", type=Path, help=f"default: <mirror>/{DEFAULT_IMAGE}")
    parser.add_argument("--out", type=Path, default=REPO / "figures" / "app_screenshot.png")
    parser.add_argument("--opacity", type=float, default=0.4, help="the overlay's, 0..1")
    args = parser.parse_args(argv)
    image = args.image or _default_image()
    if not (args.model / "bundle.json").is_file():
        print(f"error: --model {args.model}: no bundle.json there", file=sys.stderr)
        return 1
    if not image.is_file():
        print(f"error: --image {image}: not a file", file=sys.stderr)
        return 1
    if not 0.0 <= args.opacity <= 1.0:
        print(f"error: --opacity {args.opacity}: must be within 0..1", file=sys.stderr)
        return 1
    if not CHROMIUM.exists():
        print(f"error: {CHROMIUM}: not found (apt-get install -y chromium)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="app-screenshot-") as work:
        server, url, _ = start_app(args.model.resolve(), 4, Path(work))
        try:
            shown = capture(url, image.resolve(), args.out, args.opacity)
        except ScreenshotError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    confidences = ", ".join(f"{name} {value:.1%}" for name, value in shown["confidences"].items())
    print(f"{args.out}: {shown['message']}")
    print(f"predicted {shown['predicted']}; confidences {confidences}")
    if shown["blocked_outside_requests"]:
        print(f"blocked {len(shown['blocked_outside_requests'])} requests outside the app")
    return 0


if __name__ == "__main__":
    sys.exit(main())
