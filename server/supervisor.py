"""Background tasks that never die silently: each runs under a supervisor that logs any failure with its
traceback and starts it again after a short pause (the prober, the image sweeper, the node agent's
registration loops)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("sdserve.server")
RESTART_SECONDS = 1.0


def supervise(name: str, run: Callable[[], Awaitable[None]], restart_after: float = RESTART_SECONDS
              ) -> asyncio.Task[None]:
    """Start `run()` as a task; when it raises (or returns), log it and run it again after `restart_after`.
    Cancelling the returned task stops it for good."""
    return asyncio.create_task(_keep_running(name, run, restart_after), name=name)


async def _keep_running(name: str, run: Callable[[], Awaitable[None]], restart_after: float) -> None:
    while True:
        try:
            await run()
            log.error("background task %s returned; restarting it", name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background task %s failed; restarting it in %g s", name, restart_after)
        await asyncio.sleep(restart_after)
