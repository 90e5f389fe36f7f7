"""Small asyncio helpers shared by the runner's loops."""

from __future__ import annotations

import asyncio


async def first_of(*waits) -> None:
    """Wait until any of the awaitables finishes; cancel the rest."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
