"""The `echo` route: answer and send the caller's audio back (an operator's line test)."""

from __future__ import annotations

from ..calls.call import Call


async def echo(call: Call) -> None:
    await call.answer()
    assert call.media is not None
    silence = call.media.silence
    call.media.handler = lambda frame: frame if frame is not None else silence
    await call.ended.wait()
