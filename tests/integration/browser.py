"""Headless Chromium (Debian's chromium + chromedriver, driven by Selenium) as a room participant."""

from __future__ import annotations

import os
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


SCREENSHOTS = Path(os.environ.get("GATEWAY_SCREENSHOTS", Path(__file__).parents[2] / "build" / "screenshots"))
LAYOUT_PROBLEMS = """
const out = [], W = window.innerWidth, H = window.innerHeight;
if (document.documentElement.scrollWidth > W) out.push("scrolls sideways: " + document.documentElement.scrollWidth + " > " + W);
for (const e of document.querySelectorAll("button, input, select, a[href]")) {
  const r = e.getBoundingClientRect();
  if (!r.width || !r.height || getComputedStyle(e).visibility === "hidden") continue;  // not shown
  let box = e.parentElement, scrolled = false;  // inside a panel that scrolls: vertically reachable
  while (box) { const o = getComputedStyle(box).overflowY; if (o === "auto" || o === "scroll") { scrolled = true; break; } box = box.parentElement; }
  const name = (e.id || e.getAttribute("aria-label") || e.textContent || e.tagName).trim().slice(0, 30);
  if (r.left < 0 || r.right > W + 0.5) out.push(name + " outside the viewport sideways");
  if (!scrolled && (r.top < 0 || r.bottom > H + 0.5)) out.push(name + " below or above the viewport");
}
return out;
"""
DENY_ALL = """
navigator.mediaDevices.getUserMedia = () => Promise.reject(new DOMException("denied", "NotAllowedError"));
"""
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
    def __init__(self, workdir: Path, mic_wav: Path, trust_spki: str = "") -> None:
        """`trust_spki`: the SPKI hash of a (self-signed) certificate this browser trusts, and no other one."""
        opts = webdriver.ChromeOptions()
        opts.binary_location = "/usr/bin/chromium"
        pin = [f"--ignore-certificate-errors-spki-list={trust_spki}"] if trust_spki else []
        for flag in FLAGS + pin + [f"--use-file-for-fake-audio-capture={mic_wav}", f"--user-data-dir={workdir / 'chrome'}"]:
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

    def deny_all(self) -> None:
        """From the next page load on, getUserMedia refuses everything (camera and microphone denied)."""
        self.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": DENY_ALL})

    def frames_decoded(self) -> dict[str, int]:
        """framesDecoded of each inbound video stream of the page's subscription, by publisher (participant id)."""
        return self.driver.execute_async_script(FRAMES_DECODED) or {}

    def tiles(self) -> list[dict[str, Any]]:
        """The grid's tiles, one per participant: whose (participant id), its label (the name as shown), kind,
        whether it shows a video (else an avatar), speaking and muted marks."""
        return self.driver.execute_script(
            "return [...document.querySelectorAll('#grid .tile')].map(t => ({id: t.dataset.id, kind: t.dataset.kind, "
            "label: t.querySelector('.label .name').textContent, video: t.dataset.video === 'true', "
            "speaking: t.dataset.speaking === 'true', muted: t.dataset.muted === 'true', self: t.dataset.self === 'true', "
            "phone_mark: !!t.querySelector('.label .mark svg'), width: t.querySelector('video').videoWidth}))")

    def camera_tiles(self) -> dict[str, str]:
        """The other browsers' tiles that show a camera: participant id -> name."""
        return {t["id"]: t["label"] for t in self.tiles() if t["video"] and not t["self"]}

    def tracks(self) -> list[str]:
        """readyState of the page's own camera and microphone tracks ("ended" once released)."""
        return self.driver.execute_script(
            "const l = window.gwMedia && window.gwMedia.local; return l ? l.getTracks().map(t => t.readyState) : []")

    def viewport(self, width: int, height: int) -> None:
        """The page's viewport, as a desktop window or a phone (touch, narrow) of this CSS size."""
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})

    def layout_problems(self) -> list[str]:
        """What a person would hit at this size: sideways scrolling, a visible control not (fully) on screen."""
        return self.driver.execute_script(LAYOUT_PROBLEMS) or []

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def gw(self) -> dict[str, Any]:
        return self.driver.execute_script("return window.gw") or {}

    def participants(self) -> list[dict[str, Any]]:
        return list((self.gw().get("state") or {}).get("participants", []))

    def text(self, element_id: str) -> str:
        return str(self.driver.execute_script(f"return document.getElementById({element_id!r}).textContent"))

    def click(self, selector: str) -> None:
        """Click what a person would click (a CSS selector), visible or in a closed panel."""
        self.driver.execute_script("document.querySelector(arguments[0]).click()", selector)

    def listed(self) -> list[dict[str, str]]:
        """The participant list as the page shows it (the DOM, not the JS state)."""
        return self.driver.execute_script(
            "return [...document.querySelectorAll('#people li')].map(li => ({kind: li.dataset.kind, "
            "muted: li.dataset.muted, role: li.dataset.role, "
            "text: [...li.querySelectorAll('.name, .tag')].map(e => e.textContent).join('\\n')}))")

    def close(self) -> None:
        self.driver.quit()
