"""The serve page in a real headless browser (Debian's chromium + chromium-driver, driven by selenium).

Skips with the reason when selenium, chromium or chromedriver is missing (.ci/run installs them).
"""
from __future__ import annotations

import io
import shutil
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from serve_fixtures import post

webdriver = pytest.importorskip("selenium.webdriver", reason="browser tests need selenium: pip install -e '.[browser]'")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="browser tests need chromium and chromedriver (apt-get install chromium "
                                       "chromium-driver)")


def start_browser():
    """Headless chromium through the system chromedriver (no driver download)."""
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1200,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = start_browser()
    yield driver
    driver.quit()


def wait_for(condition, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def by_id(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def all_css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def pixels(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(fetch(url))))


def open_page(driver, base):
    driver.get(base + "/")
    wait_for(lambda: all_css(driver, "#gen-prior option"), what="the page to load the model info")


def set_value(element, text):
    element.clear()
    element.send_keys(str(text))


def generate(driver, prompts, n, seed):
    set_value(by_id(driver, "gen-prompts"), prompts)
    set_value(by_id(driver, "gen-n"), n)
    set_value(by_id(driver, "gen-seed"), seed)
    done = by_id(driver, "gen-status").get_attribute("data-done")
    by_id(driver, "gen-run").click()
    wait_for(lambda: by_id(driver, "gen-status").get_attribute("data-done") != done
             or "Error" in by_id(driver, "gen-status").text, what="generate")
    return [img.get_attribute("src") for img in all_css(driver, "figure.generated img")]


def test_generate_shows_n_images(browser, served):
    base, _, _ = served
    open_page(browser, base)
    sources = generate(browser, "a red circle", 5, 0)
    assert len(sources) == 5
    wait_for(lambda: all(img.get_attribute("naturalWidth") == "32" for img in all_css(browser, "figure.generated img")),
             what="the images to load")
    assert "clip2gan generate 'a red circle' -n 5 --seed 0" in by_id(browser, "model-command").get_attribute(
        "textContent")


def test_beta_slider_changes_the_edit_and_moving_back_restores_it(browser, served):
    from selenium.webdriver.common.keys import Keys

    base, _, _ = served
    open_page(browser, base)
    generate(browser, "a red circle", 2, 0)
    all_css(browser, "figure.generated button.send")[0].click()
    edited = lambda: by_id(browser, "edit-edited").get_attribute("src") or ""  # noqa: E731
    settled = lambda: by_id(browser, "tab-edit").get_attribute("data-busy") == ""  # noqa: E731
    wait_for(lambda: "/files/" in edited() and settled(), what="the first edit")
    assert "/files/" in by_id(browser, "edit-reconstruction").get_attribute("src")
    slider = all_css(browser, ".edit-beta")[0]
    start_value, start_url = slider.get_attribute("value"), edited()
    start = pixels(start_url)
    slider.send_keys(*[Keys.ARROW_RIGHT] * 30)  # each key press is an input event, as when dragging
    wait_for(lambda: settled() and edited() != start_url, what="the edit to follow the slider")
    assert slider.get_attribute("value") != start_value
    wait_for(lambda: settled() and f"--beta {float(slider.get_attribute('value')):g}" in
             by_id(browser, "edit-command").text, what="the last slider value's edit")
    assert not np.array_equal(pixels(edited()), start)
    moved_url = edited()
    slider.send_keys(*[Keys.ARROW_LEFT] * 30)
    wait_for(lambda: settled() and edited() != moved_url and
             f"--beta {float(start_value):g} " in by_id(browser, "edit-command").text, what="the slider moved back")
    assert slider.get_attribute("value") == start_value
    assert np.array_equal(pixels(edited()), start)
    assert fetch(edited()) == fetch(start_url)


def test_interpolate_produces_frames_and_a_gif_from_a_prompt_to_an_image_file(browser, served, tmp_path):
    from selenium.webdriver.support.ui import Select

    base, _, _ = served
    end_image = tmp_path / "end.png"
    end_image.write_bytes(fetch(base + post(base, "/api/generate", {"prompts": "a blue square", "n": 1})[1]
                                ["images"][0]["url"]))
    open_page(browser, base)
    all_css(browser, 'nav button[data-tab="interpolate"]')[0].click()
    Select(by_id(browser, "interp-b-kind")).select_by_value("upload")
    by_id(browser, "interp-b-file").send_keys(str(end_image))
    wait_for(lambda: "B: end.png" in by_id(browser, "interp-status").text, what="the B upload")
    set_value(by_id(browser, "interp-frames"), 6)
    by_id(browser, "interp-run").click()
    wait_for(lambda: len(all_css(browser, "figure.frame img")) == 6, what="6 frames")
    assert "clip2gan interpolate 'a red circle' end.png --frames 6" in by_id(browser, "interp-command").text
    gif = by_id(browser, "interp-gif").get_attribute("src")
    with Image.open(io.BytesIO(fetch(gif))) as animation:
        assert animation.n_frames == 6
    last = np.asarray(Image.open(io.BytesIO(fetch(all_css(browser, "figure.frame img")[-1].get_attribute("src")))))
    assert np.abs(last.astype(int) - np.asarray(Image.open(end_image)).astype(int)).mean() < 40  # ends near B


def test_a_bad_upload_shows_its_message_and_the_page_keeps_working(browser, served, tmp_path):
    base, _, _ = served
    open_page(browser, base)
    all_css(browser, 'nav button[data-tab="edit"]')[0].click()
    bad = tmp_path / "holiday.png"
    bad.write_text("not a picture at all")
    by_id(browser, "edit-upload").send_keys(str(bad))
    wait_for(lambda: "holiday.png is not an image" in by_id(browser, "edit-status").text, what="the upload error")
    assert "Error:" in by_id(browser, "edit-status").text
    all_css(browser, 'nav button[data-tab="generate"]')[0].click()
    assert len(generate(browser, "a blue square", 2, 1)) == 2


def test_two_browser_sessions_at_once_keep_their_own_seeds(browser, served):
    base, _, _ = served
    expected = {seed: [fetch(base + image["url"]) for image in
                       post(base, "/api/generate", {"prompts": "a green cross", "n": 6, "seed": seed})[1]["images"]]
                for seed in (11, 12)}
    second = start_browser()
    try:
        drivers = {11: browser, 12: second}
        for driver in drivers.values():
            open_page(driver, base)
        results = {}
        threads = [threading.Thread(target=lambda s=seed, d=driver: results.__setitem__(
            s, generate(d, "a green cross", 6, s))) for seed, driver in drivers.items()]
        [thread.start() for thread in threads]
        [thread.join(120) for thread in threads]
        for seed in (11, 12):
            assert [fetch(url) for url in results[seed]] == expected[seed]
    finally:
        second.quit()
