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


DENY_CAMERA = """
const real = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
navigator.mediaDevices.getUserMedia = (c) => c && c.video ? Promise.reject(new DOMException("denied", "NotAllowedError"))
                                                           : real(c);
"""
FRAMES_DECODED = """
const done = arguments[arguments.length - 1];
const media = window.gwMedia, pc = media && media.pcs.sub;
if (!pc) { done({}); return; }
const feeds = Object.fromEntries(media.streams.filter((s) => s.active && s.kind === "video").map((s) => [s.mid, s.feed]));
pc.getStats().then((stats) => {
  const out = {};
  stats.forEach((s) => { if (s.type === "inbound-rtp" && s.kind === "video" && feeds[s.mid]) out[feeds[s.mid]] = s.framesDecoded || 0; });
  done(out);
}, () => done({}));
"""


class Browser:
    def __init__(self, workdir: Path, mic_wav: Path) -> None:
        opts = webdriver.ChromeOptions()
        opts.binary_location = "/usr/bin/chromium"
        for flag in FLAGS + [f"--use-file-for-fake-audio-capture={mic_wav}", f"--user-data-dir={workdir / 'chrome'}"]:
            opts.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        self.driver.set_page_load_timeout(30)
        self.driver.set_script_timeout(10)

    def open(self, url: str, name: str) -> None:
        """Load the room page and let it join by itself (autojoin)."""
        sep = "&" if "?" in url else "?"
        self.driver.get(f"{url}{sep}autojoin=1&name={name}")

    def join(self, url: str, name: str) -> None:
        self.open(url, name)
        wait_until(lambda: self.gw().get("joined"), 30, "the page to join the room")

    def deny_camera(self) -> None:
        """From the next page load on, getUserMedia refuses any request with video (as a user denying it)."""
        self.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": DENY_CAMERA})

    def frames_decoded(self) -> dict[str, int]:
        """framesDecoded of each inbound video stream of the page's subscription, by publisher (participant id)."""
        return self.driver.execute_async_script(FRAMES_DECODED) or {}

    def tiles(self) -> list[dict[str, str]]:
        """The other browsers' camera tiles the page shows: whose (participant id) and its label."""
        return self.driver.execute_script(
            "return [...document.querySelectorAll('#videos .tile')].map(t => ({id: t.dataset.id, "
            "label: t.querySelector('.label').textContent, width: t.querySelector('video').videoWidth}))")

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
