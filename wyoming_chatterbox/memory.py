"""The process's resident memory, and giving freed heap memory back to the system.

An idle unload frees the model's tensors, but glibc's allocator keeps most of
the freed heap mapped for reuse, so the system (and a user watching it) sees
little of it come back; malloc_trim(0) returns it. Linux with glibc only:
elsewhere nothing is trimmed. Nothing here raises.
"""

import ctypes
import logging
import os
import sys
from typing import Optional

_LOGGER = logging.getLogger(__name__)


def resident_bytes() -> Optional[int]:
    """The process's resident set size now (Linux: /proc/self/statm); None
    where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def trim_heap() -> bool:
    """malloc_trim(0): hand the allocator's free memory back to the system.
    Whether it ran: not where there is no glibc (musl, macOS) or it failed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return False
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, ValueError, AttributeError) as err:
        _LOGGER.debug("malloc_trim is not available: %s", err)
        return False


def give_back(before: Optional[int]) -> str:
    """Trim the heap; the resident memory from `before` to now, in words for
    the log."""
    trimmed = trim_heap()
    after = resident_bytes()
    if before is None or after is None:
        return "resident memory unknown"
    return (
        f"resident memory {before / 2**20:,.0f} MB before, {after / 2**20:,.0f} MB "
        f"after{' (free heap returned with malloc_trim)' if trimmed else ''}"
    )
