"""ProjectVoices: a project whose voice changed keeps its previous prompts until the new set is rendered."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.apps.prompts import ProjectVoices, PromptError, VoiceSet

OLD: VoiceSet = ("en-US", "female", "Old greeting.")
NEW: VoiceSet = ("en-US", "male", "New greeting.")


class FakeLibrary:
    """Renders a set when the test lets it (`release`); `on_disk` are the sets another process rendered."""

    def __init__(self, on_disk: set[VoiceSet] = frozenset()) -> None:  # type: ignore[assignment]
        self.on_disk = set(on_disk)
        self.release = asyncio.Event()
        self.fail = False
        self.renders: list[VoiceSet] = []

    def rendered_already(self, voice: VoiceSet) -> bool:
        return voice in self.on_disk

    async def render_all(self, sets: list[VoiceSet]) -> int:
        self.renders.extend(sets)
        await self.release.wait()
        if self.fail:
            raise PromptError("espeak-ng missing")
        self.on_disk.update(sets)
        return 12


@pytest.mark.asyncio
async def test_the_previous_voice_plays_until_the_new_one_is_ready() -> None:
    library = FakeLibrary({OLD})
    voices = ProjectVoices(library)  # type: ignore[arg-type]
    assert voices.choose("acme", OLD) == OLD
    assert voices.choose("acme", NEW) == OLD, "the new set is rendering: the old one goes on"
    await asyncio.sleep(0)  # the rendering task starts
    assert voices.status(NEW) == "rendering" and library.renders == [NEW]
    assert voices.choose("acme", NEW) == OLD and library.renders == [NEW], "one rendering, however many calls"
    library.release.set()
    task = voices.prepare(NEW)
    assert task is not None
    await asyncio.wait_for(task, 5)
    assert voices.status(NEW) == "ready" and voices.choose("acme", NEW) == NEW


@pytest.mark.asyncio
async def test_a_project_first_heard_renders_on_demand_and_a_failure_is_not_ready() -> None:
    library = FakeLibrary()
    voices = ProjectVoices(library)  # type: ignore[arg-type]
    assert voices.choose("fresh", NEW) == NEW, "nothing earlier to play: the call renders what it needs"
    library.fail = True
    library.release.set()
    task: Any = voices._jobs[NEW]
    await asyncio.wait_for(task, 5)
    assert voices.status(NEW) == "pending", "a failed rendering is tried again by the next call"
    await voices.close()


def test_sets_rendered_by_another_process_are_ready_without_rendering() -> None:
    library = FakeLibrary({NEW})
    voices = ProjectVoices(library)  # type: ignore[arg-type]
    assert voices.status(NEW) == "ready" and library.renders == []
