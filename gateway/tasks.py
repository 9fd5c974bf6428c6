"""Stopping background tasks for sure."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def cancel_all(tasks: Iterable[asyncio.Task[None]], grace_s: float = 1.0) -> None:
    """Cancel ``tasks`` and wait until each has ended.

    Python 3.11's ``asyncio.wait_for`` can swallow a cancellation that arrives just as
    the awaited operation fails (a refused connect): the task then carries on in its
    retry loop and a plain ``cancel(); await task`` waits for ever. So: cancel again
    until it is done.
    """
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=grace_s)
