"""Remake ``docs/serve_page.png``: a real ``seq2seq serve`` of a translation model, its page in
headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by Selenium), a
sentence translated, a target token hovered, and the screenshot.

    python scripts/screenshot_page.py --model-dir runs/multi30k_en_de --name en-de \
        --text "A man in an orange hat staring at something." --output docs/serve_page.png
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--name", default="en-de")
    parser.add_argument("--text", required=True)
    parser.add_argument("--output", default="docs/serve_page.png")
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "seq2seq", "serve", "--host", "127.0.0.1",
                               "--port", str(port), "--model", f"{args.name}={args.model_dir}"])
    try:
        deadline = time.monotonic() + 120
        while True:  # bounded: the server answers /health within the deadline or the script stops
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.2)
        with tempfile.TemporaryDirectory() as profile:
            options = webdriver.ChromeOptions()
            options.binary_location = shutil.which("chromium")
            for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--no-first-run", f"--user-data-dir={profile}", "--window-size=1100,900"):
                options.add_argument(flag)
            browser = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
            try:
                wait = WebDriverWait(browser, 60, poll_frequency=0.1)
                browser.get(f"http://127.0.0.1:{port}/")
                wait.until(lambda d: d.find_element(By.ID, "model-meta").text)
                browser.find_element(By.ID, "source").send_keys(args.text)
                browser.find_element(By.ID, "translate").click()
                wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#heatmap tbody tr"))
                rows = browser.find_elements(By.CSS_SELECTOR, "#heatmap th[data-row]")
                ActionChains(browser).move_to_element(rows[len(rows) // 2]).perform()
                browser.save_screenshot(args.output)
                translation = browser.find_element(By.CSS_SELECTOR, "#translations li .text").text
                print(f"{args.output}: {translation}")
            finally:
                browser.quit()
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
