"""The web app in a real headless browser (Debian's Chromium driven by Playwright).

Uploads a real MRI slice, reads the four probabilities from the page and compares them
with the ``predict`` command's, checks the Grad-CAM overlay is displayed and re-blended by
the slider, uploads a text file renamed ``.png`` and reads the error message, clicks an
example, and checks that the page fetched nothing from outside the app (every request not
to the app's loopback address is aborted and recorded). Screenshots of each state go to
``test-artifacts/browser/``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from braintumor.predict import predict_files
from test_app import (  # noqa: F401 - shared session fixtures
    app_server,
    reference_predictor,
    served_bundle,
)

from conftest import REPO
from serving_helpers import CLASSES, bad_files, real_images

pytestmark = pytest.mark.browser

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
SCREENSHOTS = REPO / "test-artifacts" / "browser"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: `make test` installs it "
            "(apt-get install -y chromium); the browser test needs it"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `make test` installs it with the test extras")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


def _wait_for_message(page, prefix: str) -> str:
    page.wait_for_function(
        """(prefix) => {
            const box = document.querySelector('#message textarea');
            return box !== null && box.value.startsWith(prefix);
        }""",
        arg=prefix,
        timeout=TIMEOUT_MS,
    )
    return page.locator("#message textarea").input_value()


def _upload(page, path: Path) -> None:
    """Choose a file in the upload box, clearing the previous one first (as a user must:
    the box shows the chosen file instead of its file input)."""
    clear = page.locator("#upload button[aria-label=Clear]")
    if clear.count() and clear.first.is_visible():
        clear.first.click()
        _wait_for_message(page, "Upload a brain MRI slice")
    file_input = page.locator("#upload input[type=file]")
    file_input.wait_for(state="attached", timeout=TIMEOUT_MS)
    file_input.set_input_files(str(path))


def _probabilities(page) -> dict[str, float]:
    """The Label's confidence meters: class name and exact value (the bar's ``value``)."""
    pairs = page.locator("#probabilities meter").evaluate_all(
        "meters => meters.map(m => [m.getAttribute('aria-label'), m.getAttribute('value')])"
    )
    return {name: float(value) for name, value in pairs}


def _overlay_source(page) -> str:
    image = page.locator("#overlay img")
    image.wait_for(state="visible", timeout=TIMEOUT_MS)
    page.wait_for_function(
        "() => { const i = document.querySelector('#overlay img');"
        " return i !== null && i.complete && i.naturalWidth > 0; }",
        timeout=TIMEOUT_MS,
    )
    return image.get_attribute("src")


def test_upload_shows_probabilities_overlay_and_errors(
    app_server,  # noqa: F811 - the fixture imported above
    reference_predictor,  # noqa: F811
    browser,
    mirror,
    tmp_path,
) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    base = app_server["url"].rstrip("/")
    outside: list[str] = []

    def only_the_app(route) -> None:
        if route.request.url.startswith(base):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.route("**/*", only_the_app)
    page.goto(base + "/", timeout=TIMEOUT_MS)
    page.locator("#upload input[type=file]").wait_for(state="attached", timeout=TIMEOUT_MS)
    page.screenshot(path=SCREENSHOTS / "1-empty.png", full_page=True)

    # A real slice: four probabilities that sum to one and equal the predict command's.
    image = real_images(mirror, 1, offset=60)[1]
    _upload(page, image)
    message = _wait_for_message(page, f"Analysed {image.name}")
    shown = _probabilities(page)
    assert sorted(shown) == sorted(CLASSES), shown
    assert sum(shown.values()) == pytest.approx(1.0, abs=1e-4)
    (expected,) = predict_files(reference_predictor, [image], progress=False)
    for name in CLASSES:
        assert shown[name] == pytest.approx(expected.probabilities[name], abs=1e-4)
    percentages = page.locator("#probabilities dd").all_inner_texts()
    assert len(percentages) == 4 and all(text.endswith("%") for text in percentages)
    assert expected.predicted_class in message
    assert (
        page.locator("#predicted input, #predicted textarea")
        .first.input_value()
        .startswith(expected.predicted_class)
    )
    first_overlay = _overlay_source(page)
    assert page.locator("#preprocessed img").is_visible()
    page.screenshot(path=SCREENSHOTS / "2-result.png", full_page=True)

    # The opacity slider re-blends the overlay (a new image, same analysis).
    number = page.locator("#opacity input[type=number]")
    number.fill("1")
    number.press("Enter")
    page.wait_for_function(
        "(old) => { const i = document.querySelector('#overlay img');"
        " return i !== null && i.getAttribute('src') !== old && i.complete; }",
        arg=first_overlay,
        timeout=TIMEOUT_MS,
    )
    assert _probabilities(page) == shown
    page.screenshot(path=SCREENSHOTS / "3-opacity.png", full_page=True)

    # A text file renamed .png: a clear message in the page, and no stale results.
    text_file, _ = bad_files(tmp_path / "bad", mirror)["text.png"]
    _upload(page, text_file)
    message = _wait_for_message(page, "Cannot analyse this file")
    assert "text.png: not an image" in message, message
    assert "Traceback" not in page.content()
    assert _probabilities(page) == {}
    assert page.locator("#overlay img").count() == 0
    page.screenshot(path=SCREENSHOTS / "4-not-an-image.png", full_page=True)

    # An example from the test set, clicked.
    example = app_server["examples"][0]
    page.get_by_text(example.name, exact=True).first.click()
    _wait_for_message(page, f"Analysed {example.name}")
    assert len(_probabilities(page)) == 4
    _overlay_source(page)
    page.screenshot(path=SCREENSHOTS / "5-example.png", full_page=True)
    page.close()
    assert outside == [], f"the page fetched from outside the app: {outside}"
