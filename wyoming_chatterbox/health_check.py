"""Health check: a Describe round trip. Exit 0 when a TTS program answers.

Used by the Docker image's HEALTHCHECK; also handy by hand:
    python -m wyoming_chatterbox.health_check --uri tcp://127.0.0.1:10200
"""

import argparse
import asyncio
import sys

from wyoming.client import AsyncClient
from wyoming.info import Describe, Info


async def check(uri: str, timeout: float) -> bool:
    async def round_trip() -> bool:
        async with AsyncClient.from_uri(uri) as client:
            await client.write_event(Describe().event())
            while True:
                event = await client.read_event()
                if event is None:
                    return False
                if Info.is_type(event.type):
                    info = Info.from_event(event)
                    return any(program.installed for program in info.tts)

    try:
        return await asyncio.wait_for(round_trip(), timeout=timeout)
    except (OSError, asyncio.TimeoutError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default="tcp://127.0.0.1:10200")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds")
    args = parser.parse_args()
    healthy = asyncio.run(check(args.uri, args.timeout))
    print("healthy" if healthy else "unhealthy")
    sys.exit(0 if healthy else 1)


if __name__ == "__main__":
    main()
