"""The web app end to end in a real headless Chromium (Selenium + the Debian chromedriver):
upload an image, two prompts, two methods, overlays appear; a bad upload shows its one-line
message. Screenshots of each step are saved under the test's tmp folder (the path is printed).

Skipped where the app extra, selenium or chromium/chromedriver are missing.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("multipart")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("selenium")

from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from cliplens.app.core import Limits, Service
from cliplens.app.server import create_app

pytestmark = pytest.mark.app

CHROMIUM = next(
    (p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and Path(p).exists()), None
)
DRIVER = next(
    (p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver") or "") if p and Path(p).exists()), None
)
if CHROMIUM is None or DRIVER is None:
    pytest.skip("needs chromium and chromedriver", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from cliplens.adapters import load_model

    service = Service(load_model("shapes"), Limits(max_pixels=500 * 500), root=tmp_path_factory.mktemp("app"))
    port = free_port()
    srv = uvicorn.Server(
        uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started, "the app did not start"
    yield f"http://127.0.0.1:{port}/", service
    srv.should_exit = True
    thread.join(timeout=30)
    assert not service.root.exists()  # the per-process folder went with the server


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1800",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=DriverService(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screenshots")
    print(f"\nscreenshots: {folder}")
    return folder


def snap(driver, folder: Path, name: str) -> None:
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1400, min(max(900, height + 40), 6000))
    driver.save_screenshot(str(folder / f"{name}.png"))


def write_image(path: Path) -> Path:
    arr = np.full((180, 240, 3), 235, np.uint8)
    arr[40:110, 30:100] = (220, 30, 30)  # a red square
    yy, xx = np.mgrid[:180, :240]
    arr[(yy - 120) ** 2 + (xx - 170) ** 2 < 35**2] = (30, 60, 220)  # a blue circle
    Image.fromarray(arr).save(path)
    return path


def test_upload_two_prompts_two_methods_then_a_bad_upload(server, browser, shots, tmp_path):
    url, _service = server
    d = browser
    d.get(url)
    wait = WebDriverWait(d, 120)
    wait.until(lambda drv: drv.find_element(By.ID, "prompts").get_attribute("value"))  # the scene's captions
    snap(d, shots, "1-start")

    d.find_element(By.ID, "image").send_keys(str(write_image(tmp_path / "mine.png")))
    prompts = d.find_element(By.ID, "prompts")
    prompts.clear()
    prompts.send_keys("a red square\na blue circle")
    for box in d.find_elements(By.CSS_SELECTOR, "input[name=methods]"):
        if box.is_selected() != (box.get_attribute("value") in ("chefer", "rollout")):
            box.click()
    snap(d, shots, "2-filled")
    d.find_element(By.ID, "run").click()
    wait.until(EC.visibility_of_element_located((By.ID, "download")))
    snap(d, shots, "3-results")

    cards = d.find_elements(By.CSS_SELECTOR, "#results .card")
    assert len(cards) == 2 * 3  # per prompt: the original and the two methods
    methods = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#results .card .method")]
    assert methods.count("chefer") == 2 and methods.count("rollout") == 2
    overlays = d.find_elements(By.CSS_SELECTOR, "#results .card > img")
    assert len(overlays) == 6
    for img in overlays:  # every picture loaded
        assert d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
    assert d.find_element(By.ID, "error").text == ""

    # the normalised-view toggle re-renders the same run
    d.find_element(By.CSS_SELECTOR, "#mode option[value=signed]").click()
    wait.until(lambda drv: "signed-chefer" in drv.find_element(By.ID, "results").get_attribute("innerHTML"))
    snap(d, shots, "4-signed")

    # a bad upload: one line in the page, nothing else changes
    bad = tmp_path / "notes.png"
    bad.write_text("not an image at all")
    d.find_element(By.ID, "image").send_keys(str(bad))
    d.find_element(By.ID, "run").click()
    wait.until(lambda drv: drv.find_element(By.ID, "error").text)
    message = d.find_element(By.ID, "error").text
    snap(d, shots, "5-bad-upload")
    assert "not an image" in message and "\n" not in message and "Traceback" not in message
    assert str(tmp_path) not in message
    assert "stale" in d.find_element(By.ID, "results").get_attribute("class")  # the old results are dimmed


def test_scene_with_word_maps(server, browser, shots):
    url, _service = server
    d = browser
    d.get(url)
    wait = WebDriverWait(d, 120)
    wait.until(lambda drv: drv.find_element(By.ID, "prompts").get_attribute("value"))
    for box in d.find_elements(By.CSS_SELECTOR, "input[name=methods]"):
        if box.is_selected() != (box.get_attribute("value") in ("chefer", "interactions")):
            box.click()
    d.find_element(By.ID, "run").click()
    wait.until(EC.visibility_of_element_located((By.ID, "download")))
    assert d.find_elements(By.CSS_SELECTOR, "#results img.outline")  # ground-truth outlines on a scene
    assert d.find_elements(By.CSS_SELECTOR, "#results .verdict")
    word = d.find_elements(By.CSS_SELECTOR, "#results .tok.word")[0]
    card_img = word.find_element(By.XPATH, "./ancestor::div[contains(@class,'card')][1]/img[1]")
    before = card_img.get_attribute("src")
    word.click()
    assert card_img.get_attribute("src") != before and "__w" in card_img.get_attribute("src")
    snap(d, shots, "6-scene-word-map")


def test_two_tabs_at_once(server, browser, shots):
    """Two tabs submit one after the other without waiting for results (a run that finds the
    model busy waits for it: tests/test_app.py::test_two_runs_at_once); each shows its own."""
    url, _service = server
    d = browser
    wait = WebDriverWait(d, 120)
    tabs = []
    for seed, method in (("1", "legrad"), ("2", "rollout")):
        if tabs:
            d.switch_to.new_window("tab")
        d.get(url)
        wait.until(lambda drv: drv.find_element(By.ID, "prompts").get_attribute("value"))
        scene = d.find_element(By.ID, "scene")
        scene.clear()
        scene.send_keys(seed)
        d.find_element(By.ID, "loadscene").click()
        for box in d.find_elements(By.CSS_SELECTOR, "input[name=methods]"):
            if box.is_selected() != (box.get_attribute("value") == method):
                box.click()
        d.find_element(By.ID, "run").click()
        tabs.append((d.current_window_handle, seed, method))
    for handle, seed, method in tabs:
        d.switch_to.window(handle)
        wait.until(EC.visibility_of_element_located((By.ID, "download")))
        meta = d.find_element(By.CSS_SELECTOR, "#results .meta").text
        assert f"scene {seed}" in meta and method in meta
        snap(d, shots, f"7-tab-scene-{seed}")
    d.close()
    d.switch_to.window(tabs[0][0])


def _text(d, element_id: str) -> str:
    """The element's visible text read in one script call: the page re-renders its panels
    while it polls, so a found element can go stale before `.text` reaches it."""
    return d.execute_script(
        "const e = document.getElementById(arguments[0]); return e ? e.innerText : '';", element_id
    )


def _eval_state(d) -> str:
    return _text(d, "evalstate")


def _set_n(d, n: str) -> None:
    box = d.find_element(By.ID, "evaln")
    box.clear()
    box.send_keys(n)


def test_evaluation_panel(server, browser, shots):
    """The panel evaluates 3 scenes with the default methods and metrics: the progress bar
    reaches 3/3, the table (methods and baselines) and the perturbation chart appear; a long
    evaluation shows a partial table and stops on cancel; a bad N is one red line."""
    url, _service = server
    d = browser
    wait = WebDriverWait(d, 180)
    d.get(url)
    wait.until(lambda drv: drv.find_element(By.ID, "prompts").get_attribute("value"))
    _set_n(d, "3")
    d.find_element(By.ID, "evalrun").click()
    wait.until(lambda drv: _eval_state(drv) == "done")
    bar = d.execute_script("const b = document.getElementById('evalbar'); return [b.value, b.max];")
    assert bar == [3, 3]
    wait.until(lambda drv: "(final)" in _text(drv, "evalresults"))
    sources = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#evaltable tbody td:first-child")]
    assert sources == ["chefer", "legrad", "random", "centre", "oracle"]
    heads = d.find_element(By.CSS_SELECTOR, "#evaltable thead").text
    assert "pointing" in heads and "mIoU" in heads and "pos AUC" in heads
    chart = d.find_element(By.CSS_SELECTOR, "#evalresults img.evalchart")
    wait.until(
        lambda drv: drv.execute_script("return arguments[0].complete && arguments[0].naturalWidth", chart)
    )
    assert d.find_element(By.ID, "evalerror").text == ""
    d.execute_script("document.getElementById('evalpanel').scrollIntoView()")
    snap(d, shots, "8-evaluation-done")

    # a long one: the partial table comes in, cancel stops it between items
    _set_n(d, "150")
    for box in d.find_elements(By.CSS_SELECTOR, "input[name=eval_methods]"):
        if box.is_selected() != (box.get_attribute("value") == "chefer"):
            box.click()
    d.find_element(By.ID, "evalrun").click()
    wait.until(lambda drv: "(so far)" in _text(drv, "evalresults"))
    snap(d, shots, "9-evaluation-running")
    d.find_element(By.ID, "evalcancel").click()
    wait.until(lambda drv: _eval_state(drv) == "cancelled")
    done = int(d.execute_script("return document.getElementById('evalbar').value"))
    assert 1 <= done < 150
    wait.until(lambda drv: "(cancelled)" in _text(drv, "evalresults"))
    snap(d, shots, "10-evaluation-cancelled")

    _set_n(d, "0")
    d.find_element(By.ID, "evalrun").click()
    wait.until(lambda drv: _text(drv, "evalerror"))
    assert "between 1 and 200" in _text(d, "evalerror")
