"""What every HTTP handler needs, in one object on the aiohttp application."""

import asyncio
import time
from dataclasses import dataclass, field
from typing import Optional

from aiohttp import web

from ..engine import EngineWorker
from ..reply import Replies
from ..settings import Settings
from ..wire import data_cap
from .access import Access


@dataclass
class WebState:
    replies: Replies
    settings: Settings
    access: Access
    started: float = field(default_factory=time.time)
    # Uploads read and checked at once (each holds its clip in memory).
    uploads: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))

    @property
    def engine(self) -> EngineWorker:
        return self.replies.engine

    @property
    def idle(self) -> Optional[float]:
        """The idle timeout of a Wyoming connection, for reads and writes."""
        return self.settings.server.idle_timeout

    @property
    def max_chars(self) -> int:
        return self.settings.reply.max_text_chars

    @property
    def body_cap(self) -> int:
        """A JSON body cap that lets the longest allowed text through."""
        return data_cap(self.max_chars)


STATE = web.AppKey("state", WebState)
