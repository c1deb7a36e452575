"""The page at `/` in a real browser: headless Chromium driven through Selenium against the live
`showo serve`. It types a prompt and sees the preview update and the final image appear (the same
PNG `showo generate` writes), asks about an uploaded image and sees the streamed answer, and
inpaints under a brush stroke. A screenshot is saved to tests/artifacts/server_page.png (ignored
by git)."""

from __future__ import annotations

import base64
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REF, TESTS
from server_harness import API_KEY

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev dependency (pip install -e '.[dev]')")

IMAGE = REF / "images" / "magvit_in_0.png"
ARTIFACTS = TESTS / "artifacts"
CHROMIUM_FLAGS = [
    # This machine's closed network: no background fetches, no QUIC, no first-run services.
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1100,1900",
]


def find(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name) or (name if Path(name).is_file() else None)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    chromium = find("chromium", "chromium-browser", "google-chrome", "/usr/bin/chromium")
    driver_path = find("chromedriver", "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip(f"no Chromium here (browser: {chromium}, chromedriver: {driver_path}); "
                    "install Debian's chromium and chromium-driver (.ci/run does with apt-get)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="showo-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver, condition, timeout=90.0, message=""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d), message)


def data_png(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,"), src[:40]
    im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    im.load()
    return im


def test_page_generates_with_previews_and_answers_about_an_upload(browser, live_server, served_cli_images, served_answer):
    from selenium.webdriver.common.by import By

    d = browser
    d.get(live_server.url + "/")
    key = d.find_element(By.ID, "api-key")
    key.send_keys(API_KEY)
    d.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    wait(d, lambda d: "128px" in d.find_element(By.ID, "model").text, 30, "the page did not reach /health")

    # generate: a prompt, settings, live previews, the final image
    d.find_element(By.ID, "gen-prompt").send_keys("a red cat")
    for field, value in (("gen-steps", "2"), ("gen-guidance", "1.5"), ("gen-seed", "3"), ("gen-partials", "1")):
        box = d.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    d.find_element(By.ID, "gen-button").click()
    previews = []

    def preview_then_final(d):
        src = d.find_element(By.ID, "gen-preview").get_attribute("src") or ""
        if src and (not previews or previews[-1] != src):
            previews.append(src)
        return d.find_element(By.ID, "gen-result").get_attribute("src")

    final_src = wait(d, preview_then_final, message="no final image on the page: " + d.find_element(By.ID, "gen-status").text)
    assert d.find_element(By.ID, "gen-preview").get_attribute("data-partials") == "1"
    assert len(previews) == 1 and data_png(previews[0]).size == (128, 128)
    final = data_png(final_src)  # the same PNG as `showo generate "a red cat" --steps 2 -g 1.5 -s 3`
    assert base64.b64decode(final_src.split(",", 1)[1]) == served_cli_images[0].read_bytes()
    assert final.text["seed"] == "3" and "seed 3" in d.find_element(By.ID, "gen-status").text

    # ask: upload an image, type a question, watch the answer stream in
    d.find_element(By.ID, "ask-file").send_keys(str(IMAGE))
    wait(d, lambda d: (d.find_element(By.ID, "ask-thumb").get_attribute("src") or "").startswith("data:"), 30)
    d.find_element(By.ID, "ask-question").send_keys("What is in this image?")
    tokens = d.find_element(By.ID, "ask-max-tokens")
    tokens.clear()
    tokens.send_keys("12")
    d.find_element(By.ID, "ask-button").click()
    wait(d, lambda d: d.find_element(By.ID, "ask-answer").get_attribute("data-done") == "1",
         message="no answer: " + d.find_element(By.ID, "ask-status").text)
    answer = d.find_element(By.ID, "ask-answer").get_attribute("textContent")
    assert answer == served_answer[0]



def test_page_inpaints_what_the_brush_covers(browser, live_server):
    """Paint a stroke, inpaint: the mask the page sends is OpenAI's (transparent = repaint) and the
    server repaints exactly the tokens under the stroke."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from showo_mlx.images import mask_tokens, preprocess_mask

    d = browser
    d.find_element(By.ID, "edit-file").send_keys(str(IMAGE))
    wait(d, lambda d: d.execute_script("return document.getElementById('edit-paint').width") == 128, 30)
    d.execute_script("document.getElementById('edit-brush').value = 64")  # the widest brush: 32 image pixels
    paint = d.find_element(By.ID, "edit-paint")  # shown at 256 px: 2 screen pixels per image pixel
    ActionChains(d).move_to_element_with_offset(paint, -100, -100).click_and_hold().move_by_offset(60, 0) \
        .move_by_offset(0, 40).release().perform()
    mask_src = d.execute_async_script("brushMask().then(b => { const r = new FileReader(); "
                                      "r.onload = () => arguments[0](r.result); r.readAsDataURL(b); })")
    alpha = np.asarray(data_png(mask_src).getchannel("A"))
    assert alpha.shape == (128, 128) and set(np.unique(alpha)) == {0, 255} and (alpha == 0).sum() > 100
    cli_mask = Image.fromarray(np.where(alpha < 128, 255, 0).astype(np.uint8), "L")
    expected_tokens = int(mask_tokens(preprocess_mask(cli_mask, 128), (8, 8)).sum())
    assert 0 < expected_tokens < 64

    d.find_element(By.ID, "edit-prompt").send_keys("a red square")
    d.find_element(By.ID, "edit-steps").send_keys("2")
    d.find_element(By.ID, "edit-button").click()
    src = wait(d, lambda d: d.find_element(By.ID, "edit-result").get_attribute("src"),
               message="no inpainted image: " + d.find_element(By.ID, "edit-status").text)
    out = data_png(src)
    assert out.size == (128, 128) and out.text["task"] == "inpaint" and out.text["prompt"] == "a red square"
    assert out.text["repainted_tokens"] == str(expected_tokens)
    assert d.find_element(By.ID, "edit-preview").get_attribute("data-partials") == "1"

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "server_page.png"
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 0
