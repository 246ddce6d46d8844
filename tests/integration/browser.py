"""Headless Chromium (Debian's chromium + chromedriver, driven by Selenium) as a room participant."""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Any

import numpy as np
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tests.conftest import wait_until

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic", "--use-fake-ui-for-media-stream",
         "--use-fake-device-for-media-stream", "--allow-loopback-in-peer-connection",
         "--autoplay-policy=no-user-gesture-required"]


def tone_wav(path: Path, freq: float, seconds: float = 60.0, rate: int = 48000) -> Path:
    t = np.arange(int(rate * seconds)) / rate
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((8000 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes())
    return path


class Browser:
    def __init__(self, workdir: Path, mic_wav: Path) -> None:
        opts = webdriver.ChromeOptions()
        opts.binary_location = "/usr/bin/chromium"
        for flag in FLAGS + [f"--use-file-for-fake-audio-capture={mic_wav}", f"--user-data-dir={workdir / 'chrome'}"]:
            opts.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        self.driver.set_page_load_timeout(30)
        self.driver.set_script_timeout(10)

    def join(self, url: str, name: str) -> None:
        sep = "&" if "?" in url else "?"
        self.driver.get(f"{url}{sep}autojoin=1&name={name}")
        wait_until(lambda: self.gw().get("joined"), 30, "the page to join the room")

    def gw(self) -> dict[str, Any]:
        return self.driver.execute_script("return window.gw") or {}

    def participants(self) -> list[dict[str, Any]]:
        return list((self.gw().get("state") or {}).get("participants", []))

    def listed(self) -> list[dict[str, str]]:
        """The participant list as the page shows it (the DOM, not the JS state)."""
        return self.driver.execute_script(
            "return [...document.querySelectorAll('#people li')].map(li => ({kind: li.dataset.kind, "
            "muted: li.dataset.muted, role: li.dataset.role, text: li.innerText}))")

    def close(self) -> None:
        self.driver.quit()
