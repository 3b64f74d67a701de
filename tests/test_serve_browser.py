"""The page of ``seq2seq serve`` in a real headless Chromium, driven by Selenium.

Debian's ``chromium`` and ``chromium-driver`` packages provide the browser (``.ci/run``
installs them). The test loads the page from a real server, translates as a person would,
checks the text and the heatmap against ``Translator``, hovers a row, and saves a screenshot:
to ``$SEQ2SEQ_SCREENSHOT`` when set (``docs/serve_page.png`` is made so, with
``$SEQ2SEQ_SCREENSHOT_MODEL`` naming a better-trained model than the test's own).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import run_cli, serving

from seq2seq.decoding.translator import Translator

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")
if CHROMIUM is None or DRIVER is None:
    pytest.skip(f"no Chromium here (chromium: {CHROMIUM}, chromedriver: {DRIVER}); install Debian's "
                f"chromium and chromium-driver packages to run this test", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_CHARS = 40


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console: CSP reports
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(driver, condition, seconds: float = 60):
    return WebDriverWait(driver, seconds, poll_frequency=0.1).until(lambda d: condition(d))


def csp_reports(driver) -> list[str]:
    """The console's messages about the Content-Security-Policy since the last call."""
    messages = [entry["message"] for entry in driver.get_log("browser")]
    return [message for message in messages if "Content Security Policy" in message]


def translate_in_page(driver, text: str, keys: bool = False) -> None:
    source = driver.find_element(By.ID, "source")
    source.clear()
    source.send_keys(text)
    driver.execute_script("document.getElementById('translations').replaceChildren()")
    if keys:
        source.send_keys(Keys.CONTROL, Keys.ENTER)
    else:
        driver.find_element(By.ID, "translate").click()
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#translations li .text")
             or d.find_element(By.ID, "error").is_displayed())


def test_the_page_translates_and_shows_where_the_model_looked(browser, demo_model_dir, tmp_path):
    model_dir = Path(os.environ.get("SEQ2SEQ_SCREENSHOT_MODEL") or demo_model_dir)
    translator = Translator.load(model_dir, device="cpu")
    sentence = "attention"
    with serving("--model", f"reversal={model_dir}", "--model", f"same={model_dir}",
                 "--max-chars", str(MAX_CHARS)) as (process, port):
        browser.get(f"http://127.0.0.1:{port}/")
        wait_for(browser, lambda d: d.find_element(By.ID, "model-meta").text)
        assert browser.find_element(By.ID, "model-meta").text.startswith("reversal: ")
        picker = browser.find_element(By.ID, "model")  # shown when there are several models
        assert picker.is_displayed()
        assert [o.text for o in picker.find_elements(By.TAG_NAME, "option")] == ["reversal", "same"]

        translate_in_page(browser, sentence)
        assert browser.find_element(By.CSS_SELECTOR, "#translations li .text").text == \
            translator.translate([sentence])[0]
        alignment = translator.attention(sentence)
        rows = browser.find_elements(By.CSS_SELECTOR, "#heatmap tbody tr")
        assert len(rows) == len(alignment.target_pieces)  # one row per target token
        assert all(len(row.find_elements(By.TAG_NAME, "td")) == len(alignment.source_pieces) for row in rows)

        # hovering a target token shades each source token by its weight, the largest darkest
        row = len(rows) // 2
        ActionChains(browser).move_to_element(
            browser.find_element(By.CSS_SELECTOR, f"#heatmap th[data-row='{row}']")).perform()
        wait_for(browser, lambda d: "active" in d.find_element(
            By.CSS_SELECTOR, f"#heatmap th[data-row='{row}']").get_attribute("class"))
        shades = [float(th.get_attribute("data-weight"))
                  for th in browser.find_elements(By.CSS_SELECTOR, "#heatmap th.src-tok")]
        assert shades == pytest.approx(alignment.weights[row], abs=2e-4)
        # and the other way round: a source token shades the target tokens that looked at it
        column = int(alignment.weights[row].argmax())
        ActionChains(browser).move_to_element(
            browser.find_element(By.CSS_SELECTOR, f"#heatmap th[data-col='{column}']")).perform()
        wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#heatmap th.tgt-tok").get_attribute(
            "data-weight"))
        shades = [float(th.get_attribute("data-weight"))
                  for th in browser.find_elements(By.CSS_SELECTOR, "#heatmap th.tgt-tok")]
        assert shades == pytest.approx(alignment.weights[:, column], abs=2e-4)
        ActionChains(browser).move_to_element(
            browser.find_element(By.CSS_SELECTOR, f"#heatmap th[data-row='{row}']")).perform()
        screenshot = Path(os.environ.get("SEQ2SEQ_SCREENSHOT") or tmp_path / "serve_page.png")
        assert browser.save_screenshot(str(screenshot))
        assert screenshot.read_bytes()[:8] == PNG_MAGIC

        # Ctrl+Enter translates too; over the limit is a clear message
        translate_in_page(browser, "reversal", keys=True)
        assert browser.find_element(By.CSS_SELECTOR, "#translations li .text").text == \
            translator.translate(["reversal"])[0]
        translate_in_page(browser, "a" * (MAX_CHARS + 1))
        error = browser.find_element(By.ID, "error")
        assert error.is_displayed() and error.text.startswith("Over a limit:") and "--max-chars" in error.text

        # all of the above ran under the server's Content-Security-Policy, which refuses any
        # other inline script: one added now does not run, and the console says why
        assert not csp_reports(browser)
        ran = browser.execute_script("""
            const script = document.createElement("script");
            script.textContent = "window.injected = true";
            document.body.appendChild(script);
            return window.injected === true;""")
        assert not ran and any("Content Security Policy" in report for report in csp_reports(browser))

        # readable on a phone: nothing wider than the screen but the heatmap's own scroll box
        browser.set_window_size(375, 800)
        translate_in_page(browser, sentence)
        assert browser.execute_script("return document.documentElement.scrollWidth") <= \
            browser.execute_script("return window.innerWidth")

        process.terminate()
        process.wait(60)
    translate_in_page(browser, sentence)
    assert browser.find_element(By.ID, "error").text.startswith("The server is unavailable")


def test_the_static_attention_page_draws_with_no_server(browser, demo_model_dir, tmp_path):
    page = tmp_path / "attention.html"
    done = run_cli("attention", "--model-dir", demo_model_dir, "--text", "serve", "--html", page)
    assert done.returncode == 0, done.stderr
    browser.set_window_size(375, 800)  # a phone's width
    browser.get(page.as_uri())
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#heatmap tbody tr"))
    alignment = Translator.load(demo_model_dir, device="cpu").attention("serve")
    assert browser.find_element(By.CSS_SELECTOR, "#translations li .text").text == alignment.translation
    assert len(browser.find_elements(By.CSS_SELECTOR, "#heatmap tbody tr")) == len(alignment.target_pieces)
    assert not browser.find_element(By.ID, "form").is_displayed()
    first_target_token = browser.find_element(By.CSS_SELECTOR, ".tok[data-row='0']")
    ActionChains(browser).move_to_element(first_target_token).perform()
    shades = [float(th.get_attribute("data-weight"))
              for th in browser.find_elements(By.CSS_SELECTOR, "#heatmap th.src-tok")]
    assert shades == pytest.approx(alignment.weights[0], abs=2e-4)
    assert browser.execute_script("return document.documentElement.scrollWidth") <= \
        browser.execute_script("return window.innerWidth")
    if os.environ.get("SEQ2SEQ_SCREENSHOT"):
        browser.save_screenshot(str(tmp_path / "phone.png"))
