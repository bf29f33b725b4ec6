"""The real server with the fake backend, for tests over stdio:
python tests/fake_server.py --uri stdio:// [--delay SECONDS] [--no-streaming]"""

import argparse
import asyncio
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fakes import FakeBackend  # noqa: E402
from wyoming_chatterbox.server import run_server  # noqa: E402
from wyoming_chatterbox.settings import Settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uri", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--no-streaming", action="store_true")
    parser.add_argument("--chatty", action="store_true")
    parser.add_argument("--grace", type=float, default=5.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    settings = Settings.of(
        default_voice="default",
        streaming=not args.no_streaming,
        loudness=None,
        clean_text=False,
        shutdown_grace=args.grace,
    )
    asyncio.run(
        run_server(
            FakeBackend(delay=args.delay, chatty=args.chatty),
            settings.replace(server={"uri": args.uri}),
        )
    )


if __name__ == "__main__":
    main()
