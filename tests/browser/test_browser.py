"""The web app in a real headless browser (Debian's Chromium driven by Playwright).

Uploads a real tumour slice, reads the four probabilities from the page and compares them
with the ``predict`` command's, checks the layout (the uploaded slice and its Grad-CAM
overlay side by side at display size, the probabilities beside them), that the slider
re-blends the overlay, that a food photograph gets a refusal and no stale results, that an
example can be clicked, that the page names no server path, and that the page fetched
nothing from outside the app (every request not to the app's loopback address is aborted
and recorded).

Screenshots of each state are test artifacts: in ``$BRAINTUMOR_TEST_ARTIFACTS/browser/``
when that is set (CI sets it to its ``test-artifacts/`` folder), else in the test's
temporary folder; the test prints where.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from braintumor.serving.app.handlers import DISPLAY_SIZE
from braintumor.serving.predict import predict_files

from conftest import REPO
from serving_helpers import CLASSES, real_images

pytestmark = pytest.mark.browser

ARTIFACTS_ENV = "BRAINTUMOR_TEST_ARTIFACTS"
TIMEOUT_MS = 60_000


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


def _image_source(page, elem_id: str = "overlay") -> str:
    image = page.locator(f"#{elem_id} img")
    image.wait_for(state="visible", timeout=TIMEOUT_MS)
    page.wait_for_function(
        "(id) => { const i = document.querySelector('#' + id + ' img');"
        " return i !== null && i.complete && i.naturalWidth > 0; }",
        arg=elem_id,
        timeout=TIMEOUT_MS,
    )
    return image.get_attribute("src")


def _screenshots(tmp_path: Path) -> Path:
    configured = os.environ.get(ARTIFACTS_ENV)
    folder = (Path(configured) if configured else tmp_path) / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"browser screenshots in {folder}")
    return folder


def _check_layout(page) -> None:
    """The slice and the overlay side by side, each shown at least 384 px wide (from
    ``DISPLAY_SIZE`` images, whatever the model's input size), the probabilities beside."""
    natural = page.locator("#slice img, #overlay img").evaluate_all(
        "images => images.map(i => [i.naturalWidth, i.naturalHeight])"
    )
    assert natural == [[DISPLAY_SIZE, DISPLAY_SIZE]] * 2, natural
    shown = page.locator("#slice img").bounding_box()
    overlay = page.locator("#overlay img").bounding_box()
    probabilities = page.locator("#probabilities").bounding_box()
    assert shown["width"] >= 384 and overlay["width"] >= 384, (shown, overlay)
    assert overlay["x"] >= shown["x"] + shown["width"] - 1, (shown, overlay)
    assert abs(overlay["y"] - shown["y"]) < 40, (shown, overlay)
    assert probabilities["x"] >= overlay["x"] + overlay["width"] - 1, (overlay, probabilities)
    assert probabilities["y"] < shown["y"] + shown["height"], (shown, probabilities)


def _analyse_a_slice(page, image: Path, reference_predictor) -> tuple[dict, str]:  # noqa: F811
    """Upload ``image``; the page's probabilities must equal the predict command's.
    Returns them and the overlay's source."""
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
    _image_source(page, "slice")
    return shown, _image_source(page, "overlay")


def _check_no_server_paths(page, server: dict, mirror: Path) -> None:
    """The page names the model by its hash; no bundle, temp, data or repository path."""
    text = page.inner_text("body")
    bundle = server["bundle"]
    for secret in (str(bundle.parent), str(server["temp_root"]), str(mirror), str(REPO)):
        assert secret not in text, secret
    assert "model sha256" in page.locator("#model").inner_text()


def _refuse(page, path: Path, words: str) -> None:
    """Upload ``path``: a one-line refusal naming it, and no stale results."""
    _upload(page, path)
    message = _wait_for_message(page, "Cannot analyse this file")
    assert f"{path.name}: " in message and words in message, message
    assert "Traceback" not in page.content()
    assert _probabilities(page) == {}
    assert page.locator("#overlay img").count() == 0 and page.locator("#slice img").count() == 0


def test_upload_shows_slice_overlay_probabilities_and_refusals(
    app_server,  # noqa: F811 - the fixture imported above
    reference_predictor,  # noqa: F811
    browser,
    mirror,
    tmp_path,
) -> None:
    screenshots = _screenshots(tmp_path)
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
    page.screenshot(path=screenshots / "1-empty.png", full_page=True)

    # A real glioma slice: four probabilities that sum to one and equal predict's.
    image = real_images(mirror, 1, offset=60)[0]
    shown, first_overlay = _analyse_a_slice(page, image, reference_predictor)
    _check_layout(page)
    page.screenshot(path=screenshots / "2-tumour-slice.png", full_page=True)
    _check_no_server_paths(page, app_server, mirror)

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
    page.screenshot(path=screenshots / "3-opacity.png", full_page=True)

    # A food photograph: a clear refusal, and no stale results.
    _refuse(page, mirror / "not-mri" / "food_001.jpg", "colour")
    page.screenshot(path=screenshots / "4-refused-food-photo.png", full_page=True)

    # An example from the test set, clicked.
    example = app_server["examples"][0]
    page.get_by_text(example.name, exact=True).first.click()
    _wait_for_message(page, f"Analysed {example.name}")
    assert len(_probabilities(page)) == 4
    _image_source(page, "overlay")
    page.screenshot(path=screenshots / "5-example.png", full_page=True)
    page.close()
    assert outside == [], f"the page fetched from outside the app: {outside}"
    assert {"2-tumour-slice.png", "4-refused-food-photo.png"} <= set(os.listdir(screenshots))
