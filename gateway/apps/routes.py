"""Which flow a call gets, by its DID's route: "ivr"/"room" the dial-in prompts then the room, "api" on hold for
the application, a dial-out straight into its room. Each flow runs `guarded` (missing prompts end the call)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..calls.call import Call
from ..calls.control import Order
from ..config import DidConfig
from .dialin import DialIn
from .inroom import hosted
from .services import IvrServices, Voice, guarded, project_settings

Route = Callable[[Call], Awaitable[None]]


def make_dial_in(services: IvrServices) -> Route:
    """Routes "ivr" and "room": the dial-in prompts, then the room."""
    async def dial_in(call: Call) -> None:
        did = services.config.did(str(call.info["did"])) or DidConfig(  # else a project's number with route "ivr"
            number=str(call.info["did"]), route="ivr", project=str(call.info["project"]))
        voice = Voice(call, services, project_settings(services, did.project), did)

        async def flow() -> None:
            order = await DialIn(voice, did).run()
            if not call.ended.is_set():
                await hosted(voice, order)

        await guarded(call, flow())

    return dial_in


def make_api_route(services: IvrServices) -> Route:
    """Route "api": answer, hold, and wait for the application (the `incoming` webhook) to bridge the call."""
    async def api_route(call: Call) -> None:
        voice = Voice(call, services, project_settings(services, str(call.info["project"])))
        await call.answer()
        await guarded(call, hosted(voice))

    return api_route


async def run_hosted(call: Call, services: IvrServices, order: Order) -> None:
    """A dial-out call once answered: straight into the room of `order`."""
    voice = Voice(call, services, project_settings(services, str(call.info["project"])))
    await guarded(call, hosted(voice, order))
