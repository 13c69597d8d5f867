"""The web edge in a real browser: Debian's Chromium driven by selenium against a uvicorn gateway and
a vqa-worker (the e2e stack of conftest.py) serving the bundled ``llava-mini-shapes``.

The page at ``GET /`` encodes the photo in the browser (edge_client/web/alignedvq.js), so the
request it sends must be byte for byte what the Python client would send: the test computes that
length with ``EdgeEncoder`` from the bundle the gateway serves and reads it back from ``#bytes``.
Nothing is mocked: real Chromium, real gateway, real Redis, real worker and model.

``VQA_WEB_SCREENSHOTS=docs/web`` also writes the screenshots of docs/web/ (phone 390x844 and
desktop 1280x900).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from benchmarks.harness.browser import chromium, installed
from models.store import BUNDLED
from tests.gateway.helpers import API_KEY

MODEL_DIR = BUNDLED / "llava-mini-shapes"
QUANTIZER = "preln-r2x4096-t12-ranked"
REPO = Path(__file__).parents[2]
# The sample photos (edge_client/samples, or samples/ at the root of older checkouts).
SAMPLES = next(
    p for p in (REPO / "edge_client" / "samples", REPO / "samples") if (p / "red_circle.png").exists()
)
PHONE = (390, 844)
ERROR_TEXT = "const e = document.getElementById('error'); return e.hidden ? '' : e.textContent"
ERROR_SHOWN = "return !document.getElementById('error').hidden"
DESKTOP = (1280, 900)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    """Headless Chromium under chromedriver, launched as the web benchmarks launch it."""
    assert installed(), "the web e2e test needs Debian's chromium and chromium-driver (.ci/run installs them)"
    with chromium(tmp_path / "chromium") as driver:
        driver.set_page_load_timeout(30)
        yield driver


def viewport(driver, width: int, height: int, mobile: bool) -> None:
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
    )


def text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def ask_and_wait(driver, timeout: float = 90) -> str:
    """Click Ask; returns the answer, or fails with the page's error box."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "ask").click()
    return wait_answer(driver, timeout)


def wait_answer(driver, timeout: float = 90) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    def settled(d) -> bool:
        busy = d.execute_script("return document.getElementById('results').hasAttribute('aria-busy')")
        return not busy and (text(d, "answer") != "" or d.execute_script(ERROR_SHOWN))

    WebDriverWait(driver, timeout).until(settled)
    error = driver.execute_script(ERROR_TEXT)
    assert not error, f"the page shows an error: {error}"
    return text(driver, "answer")


def expected_body_bytes(url: str, image: Path, question: str) -> int:
    """What the Python client's request for this photo and question weighs (22-char request id)."""
    from edge_client.bundle import EdgeBundle
    from edge_client.encoder import EdgeEncoder
    from edge_client.protocol import encode_request, parse_request

    auth = {"Authorization": f"Bearer {API_KEY}"}
    reply = httpx.get(f"{url}/v1/models/{MODEL_DIR.name}/edge-bundle", headers=auth, timeout=30)
    reply.raise_for_status()
    encoder = EdgeEncoder(EdgeBundle.from_bytes(reply.content))
    stream = encoder.encode_image(np.asarray(Image.open(image).convert("RGB")))
    fields = dict(request_id="r" * 22, model=MODEL_DIR.name, question=question, features=stream)
    return len(encode_request(parse_request(fields)))


def test_page_answers_from_the_browser(stack, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    stack.worker("--max-batch", "8", "--max-wait-ms", "10", model=str(MODEL_DIR), quantizer=QUANTIZER)
    stack.wait_live(1, model=MODEL_DIR.name)

    page = httpx.get(f"{stack.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert csp.startswith("default-src 'self'") and "https:" not in csp and "http:" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(f"{stack.url}/web/..%2Fbundle.py", timeout=10).status_code == 404

    driver = browser
    viewport(driver, *PHONE, mobile=True)
    driver.get(f"{stack.url}/")
    for element_id in ("image", "question", "api-key", "model", "cloud-only"):  # every input is labelled
        label = f"return !!document.querySelector('label[for=\"{element_id}\"]')"
        assert driver.execute_script(label), element_id
    image_input = driver.find_element(By.ID, "image")
    assert image_input.get_attribute("accept") == "image/*"
    assert image_input.get_attribute("capture") == "environment"
    assert driver.find_element(By.ID, "question").get_attribute("maxlength") == "1024"

    driver.find_element(By.ID, "api-key").send_keys(API_KEY)
    driver.find_element(By.ID, "api-key").send_keys(Keys.TAB)  # change event: the picker fills
    WebDriverWait(driver, 30).until(
        lambda d: d.find_element(By.ID, "model").get_attribute("value") == MODEL_DIR.name
    )
    assert QUANTIZER in driver.find_element(By.ID, "model").text
    assert driver.execute_script("return sessionStorage.getItem('alignedvq.apiKey')") == API_KEY
    assert API_KEY not in driver.current_url

    photo = SAMPLES / "red_circle.png"
    question = "what color is the shape?"
    image_input.send_keys(str(photo))
    driver.find_element(By.ID, "question").send_keys(question)
    assert ask_and_wait(driver) == "red"
    body = text(driver, "bytes")
    assert re.fullmatch(r"[0-9]+", body), body
    assert int(body) == expected_body_bytes(stack.url, photo, question)  # the same bytes as Python's
    jpeg = text(driver, "jpeg-bytes")
    assert re.fullmatch(r"[0-9]+", jpeg) and int(jpeg) > int(body)
    assert float(text(driver, "bits-per-token")) > 0
    assert float(text(driver, "edge-ms")) > 0 and float(text(driver, "rtt-ms")) > 0
    assert "ranked coder" in text(driver, "bits-summary")
    assert driver.execute_script("return document.documentElement.scrollWidth") <= PHONE[0]
    if os.environ.get("VQA_WEB_SCREENSHOTS"):
        save_screenshots(driver, Path(os.environ["VQA_WEB_SCREENSHOTS"]))

    # Cloud-only, asked from the keyboard (Enter in the question field submits the form).
    driver.find_element(By.ID, "cloud-only").click()
    question_input = driver.find_element(By.ID, "question")
    question_input.clear()
    question_input.send_keys("is there a circle in the image?", Keys.ENTER)
    assert wait_answer(driver) == "yes"
    assert text(driver, "bytes") == text(driver, "jpeg-bytes")

    # Another photo, features again.
    driver.find_element(By.ID, "cloud-only").click()
    image_input.send_keys(str(SAMPLES / "blue_triangle.png"))
    question_input.clear()
    question_input.send_keys("what shape is in the image?")
    assert ask_and_wait(driver) == "triangle"

    # At 360 px nothing scrolls sideways.
    viewport(driver, 360, 740, mobile=True)
    assert driver.execute_script("return document.documentElement.scrollWidth") <= 360

    # A wrong key: the gateway's error code and message on the page.
    key_input = driver.find_element(By.ID, "api-key")
    key_input.clear()
    key_input.send_keys("not-the-key", Keys.TAB)
    driver.find_element(By.ID, "ask").click()
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(ERROR_SHOWN))
    assert "unauthorized" in text(driver, "error")
    assert not any("Content Security Policy" in entry["message"] for entry in driver.get_log("browser"))


def save_screenshots(driver, folder: Path) -> None:
    """Phone (390x844): the form, then the answer and overlay; desktop (1280x900): the whole page."""
    folder.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(folder / "phone-form.png"))
    driver.execute_script("document.getElementById('results').scrollIntoView({block: 'start'})")
    driver.save_screenshot(str(folder / "phone-answer.png"))
    viewport(driver, *DESKTOP, mobile=False)
    driver.execute_script("window.scrollTo(0, 0)")
    driver.execute_script("document.getElementById('show-bits').dispatchEvent(new Event('change'))")
    driver.save_screenshot(str(folder / "desktop.png"))
    viewport(driver, *PHONE, mobile=True)
    driver.execute_script("document.getElementById('show-bits').dispatchEvent(new Event('change'))")
