"""Jittered exponential backoff ("full jitter"): uniform(0, min(cap, base * 2**attempt))."""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    cap: float = 30.0
    base: float = 0.5
    floor: float = 0.05  # never spin: even a jitter of zero waits this long
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(self.attempt, 30))
        self.attempt += 1
        return max(self.floor, self.rng.uniform(0, ceiling))

    def reset(self) -> None:
        self.attempt = 0

    async def pause(self, stopping: asyncio.Event) -> None:
        """Wait the next backoff delay, or less when ``stopping`` is set meanwhile."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.next()):
                await stopping.wait()
