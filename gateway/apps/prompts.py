"""Spoken prompts: texts per language, rendered once with pyttsx3 (espeak-ng) into an 8 kHz cache.

Rendering runs on one dedicated thread (pyttsx3 allows one engine per process and is not thread-safe), so
it never blocks the event loop; concurrent requests for the same prompt share one rendering. A recorded
`prompts/<lang>/<key>.wav` overrides the text-to-speech for that key.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes.util
import hashlib
import io
import logging
import os
import threading
import time
import tomllib
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .. import log
from ..media import g711

logger = logging.getLogger("gateway.prompts")
RATE = 8000
VARIANTS = {"female": "+f3", "male": "+m3"}


class PromptError(RuntimeError):
    pass


def read_wav(path: Path) -> np.ndarray:
    """Mono int16 at 8 kHz from any mono/stereo 16-bit WAV (resampled with a proper low-pass)."""
    with wave.open(str(path)) as w:
        if w.getsampwidth() != 2:
            raise PromptError(f"{path}: only 16-bit PCM WAV is supported")
        rate, channels = w.getframerate(), w.getnchannels()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64)
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    if rate != RATE:
        from scipy.signal import resample_poly  # here: importing scipy.signal costs 1.5 s of CPU, and only a fresh
        # rendering (or a recorded prompt at another rate) needs it, never a process that reads the cache

        g = np.gcd(rate, RATE)
        x = resample_poly(x, RATE // g, rate // g)
    return np.clip(x, -32768, 32767).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # writers never share it
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(samples.astype("<i2").tobytes())
    os.replace(tmp, path)  # readers never see half a file


class _Tts:
    """The process's one pyttsx3 engine, used only from the executor's single thread."""

    def __init__(self) -> None:
        if ctypes.util.find_library("espeak-ng") is None and ctypes.util.find_library("espeak") is None:
            raise PromptError("text-to-speech needs espeak-ng: install the Debian packages espeak-ng and libespeak-ng1")
        try:
            import pyttsx3
        except ImportError as exc:
            raise PromptError("text-to-speech needs the Python package pyttsx3 (pip install pyttsx3)") from exc
        try:
            self.engine = pyttsx3.init("espeak")
        except Exception as exc:  # the driver raises assorted errors when the library is unusable
            raise PromptError(f"espeak-ng could not be started ({exc}): install espeak-ng and libespeak-ng1") from exc
        self.done = threading.Event()
        self.engine.connect("finished-utterance", lambda name, completed: self.done.set())
        self.voices = {v.id.lower(): v.id for v in self.engine.getProperty("voices")}

    def voice_id(self, language: str, voice_type: str) -> str:
        lang = language.lower()
        base = next((vid for low, vid in self.voices.items() if low.endswith("/" + lang)), None)
        if base is None:
            base = next((vid for low, vid in self.voices.items() if low.endswith("/" + lang.split("-")[0])), "en")
        return base + VARIANTS.get(voice_type, "")

    def render(self, text: str, language: str, voice_type: str, out: Path) -> None:
        raw = out.with_name(f"{out.stem}.{os.getpid()}.raw.wav")  # workers sharing the cache never share a raw file
        out.parent.mkdir(parents=True, exist_ok=True)
        self.done.clear()
        self.engine.setProperty("voice", self.voice_id(language, voice_type))
        with contextlib.redirect_stdout(io.StringIO()):  # the driver prints "Audio saved to ..."
            self.engine.save_to_file(text, str(raw))
            self.engine.runAndWait()
        try:
            if not self.done.wait(30) or not _settled(raw, 10.0):  # runAndWait can return before the file is written
                raise PromptError(f"espeak-ng produced no audio for {text[:40]!r}")
            write_wav(out, read_wav(raw))
        finally:
            raw.unlink(missing_ok=True)


def _settled(path: Path, timeout: float) -> bool:
    """The synthesiser's file exists and has stopped growing (polled from the TTS thread, never the event loop)."""
    deadline, last = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        size = path.stat().st_size if path.exists() else -1
        if size > 44 and size == last:
            return True
        last = size
        time.sleep(0.05)
    return False


def prompt_sets(projects: list[Any]) -> list[tuple[str, str, str]]:
    """The distinct (language, voice_type, welcome_text) the configured projects speak with."""
    return sorted({(p.language, p.voice_type, p.welcome_text) for p in projects})


class PromptLibrary:
    def __init__(self, prompts_dir: Path, cache_dir: Path) -> None:
        self.prompts_dir = prompts_dir
        self.cache_dir = cache_dir
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tts")
        self._tts: _Tts | None = None
        self._texts: dict[str, dict[str, str]] = {}
        self._pcm: dict[Path, np.ndarray] = {}
        self._encoded: dict[tuple[Path, str], bytes] = {}
        self._inflight: dict[Path, asyncio.Future[None]] = {}
        self.rendered = 0  # renderings done by this process (the rest were cache hits)
        self.render_cpu_s = 0.0  # CPU seconds the rendering thread used (espeak-ng, resampling, scipy's import)

    def texts(self, language: str) -> dict[str, str]:
        if language not in self._texts:
            path = self.prompts_dir / f"{language}.toml"
            if not path.exists():
                path = self.prompts_dir / "en-US.toml"
            try:
                self._texts[language] = {k: str(v) for k, v in tomllib.loads(path.read_text()).items()}
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise PromptError(f"{path}: {exc}") from exc
        return self._texts[language]

    def text(self, key: str, language: str, **values: Any) -> str:
        texts = self.texts(language)
        if key not in texts:
            raise PromptError(f"no prompt {key!r} in {self.prompts_dir / (language + '.toml')}")
        return texts[key].format(**values) if values else texts[key]

    def cache_path(self, text: str, language: str, voice_type: str) -> Path:
        digest = hashlib.sha256(f"{language}\0{voice_type}\0{text}".encode()).hexdigest()[:20]
        return self.cache_dir / language / voice_type / f"{digest}.wav"

    def _tts_render(self, text: str, language: str, voice_type: str, out: Path) -> None:
        started = time.thread_time()
        try:
            if self._tts is None:
                self._tts = _Tts()
            self._tts.render(text, language, voice_type, out)
        finally:  # the renderer's own thread: its CPU is a background job's, not the calls' (admission)
            self.render_cpu_s += time.thread_time() - started

    async def pcm(self, key: str, language: str = "en-US", voice_type: str = "female", text: str | None = None,
                  **values: Any) -> tuple[Path, np.ndarray]:
        """The prompt's audio (int16, 8 kHz): a recorded override, the cache, or a fresh rendering."""
        recorded = self.prompts_dir / language / f"{key}.wav"
        if text is None and not values and recorded.exists():
            path = recorded
        else:
            spoken = text if text is not None else self.text(key, language, **values)
            path = self.cache_path(spoken, language, voice_type)
            if path not in self._pcm and not path.exists():
                await self._render(key, spoken, language, voice_type, path)
        if path not in self._pcm:
            self._pcm[path] = await asyncio.get_running_loop().run_in_executor(None, read_wav, path)
        return path, self._pcm[path]

    async def _render(self, key: str, text: str, language: str, voice_type: str, path: Path) -> None:
        fut = self._inflight.get(path)
        if fut is None:
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(self._executor, self._tts_render, text, language, voice_type, path)
            self._inflight[path] = fut
            try:
                await fut
                self.rendered += 1
                log.event(logger, "prompt.rendered", key=key, language=language, voice=voice_type, file=path.name)
            finally:
                self._inflight.pop(path, None)
        else:
            await fut

    async def encoded(self, codec: str, key: str, language: str = "en-US", voice_type: str = "female",
                      text: str | None = None, **values: Any) -> bytes:
        """The prompt encoded for a call's codec, cached per (file, codec)."""
        path, pcm = await self.pcm(key, language, voice_type, text, **values)
        cached = self._encoded.get((path, codec))
        if cached is None:
            cached = self._encoded[(path, codec)] = g711.encode(codec, pcm)
        return cached

    async def render_all(self, projects: list[tuple[str, str, str]]) -> int:
        """Pre-render every prompt for (language, voice_type, welcome_text) combinations; logs progress."""
        jobs: list[tuple[str, str | None, str, str]] = []
        for language, voice_type, welcome in projects:
            for key, text in self.texts(language).items():
                if "{" in text:
                    continue  # templated prompts render on first use
                jobs.append((key, welcome if key == "welcome" and welcome else None, language, voice_type))
        for i, (key, override, language, voice_type) in enumerate(jobs, 1):
            await self.pcm(key, language, voice_type, override)
            if i % 5 == 0 or i == len(jobs):
                log.event(logger, "prompts.progress", done=i, total=len(jobs))
        return len(jobs)

    def languages(self) -> list[str]:
        """The languages prompts are written in (`prompts/<language>.toml`): what a project may speak."""
        return sorted(path.stem for path in self.prompts_dir.glob("*.toml"))

    def rendered_already(self, voice: VoiceSet) -> bool:
        """Every prompt of this set is in the cache (rendered by this process or another sharing the data dir)."""
        language, voice_type, welcome = voice
        for key, text in self.texts(language).items():
            if "{" in text or (self.prompts_dir / language / f"{key}.wav").exists():
                continue
            spoken = welcome if key == "welcome" and welcome else text
            if not self.cache_path(spoken, language, voice_type).exists():
                return False
        return True

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


VoiceSet = tuple[str, str, str]  # (language, voice_type, welcome_text): what a project's prompts sound like


class ProjectVoices:
    """What each project sounds like on this worker. A project whose welcome text, voice or language changed (the
    project API) keeps speaking with its previous set while the new one renders in the background; a set is
    ready once every prompt of it is in the cache. A project heard for the first time by this worker with a set
    not yet rendered renders on demand (the caller waits for the first prompts, as before pre-rendering ends)."""

    def __init__(self, library: PromptLibrary) -> None:
        self.library = library
        self.ready: set[VoiceSet] = set()
        self.speaking: dict[str, VoiceSet] = {}  # project -> the set its calls use now
        self._jobs: dict[VoiceSet, asyncio.Task[None]] = {}

    def choose(self, project: str, wanted: VoiceSet) -> VoiceSet:
        if self.status(wanted) == "ready":
            self.speaking[project] = wanted
            return wanted
        self._start(wanted, project)
        return self.speaking.get(project, wanted)

    def status(self, voice: VoiceSet) -> str:
        """"ready", "rendering" or "pending" (not asked for yet on this worker)."""
        if voice in self.ready:
            return "ready"
        if voice in self._jobs:
            return "rendering"
        try:
            done = self.library.rendered_already(voice)
        except PromptError:
            return "pending"
        if done:
            self.ready.add(voice)
            return "ready"
        return "pending"

    def prepare(self, voice: VoiceSet, project: str = "") -> asyncio.Task[None] | None:
        """Render the set in the background (once); the task, or None when it is ready."""
        return None if self.status(voice) == "ready" else self._start(voice, project)

    def _start(self, voice: VoiceSet, project: str) -> asyncio.Task[None]:
        """The set's rendering task (started once; the caller knows it is not ready)."""
        task = self._jobs.get(voice)
        if task is None:
            task = self._jobs[voice] = asyncio.get_running_loop().create_task(self._render(voice, project))
        return task

    async def _render(self, voice: VoiceSet, project: str) -> None:
        language, voice_type, _ = voice
        try:
            count = await self.library.render_all([voice])
            self.ready.add(voice)
            log.event(logger, "prompts.ready", project=project or None, language=language, voice=voice_type,
                      prompts=count)
        except PromptError as exc:
            log.event(logger, "prompts.unavailable", logging.ERROR, project=project or None, language=language,
                      voice=voice_type, error=str(exc))
        finally:
            self._jobs.pop(voice, None)

    async def close(self) -> None:
        for task in list(self._jobs.values()):
            task.cancel()
        await asyncio.gather(*self._jobs.values(), return_exceptions=True)
