"""The web page and the HTTP API (--http-port), on top of reply.py.

app.py (the aiohttp application, its routes and `HttpServer`), access.py (who
may use it), errors.py (JSON errors), speak.py and openai.py (speech),
voices_upload.py (voices), audio_formats.py (WAV header, encoders), state.py
(what handlers share), static/ (the page). Importing this package does not
import aiohttp: server.py imports `web.app` only when --http-port is set.
"""


class HttpStartError(Exception):
    """The HTTP side cannot start; the text says why, for the user."""
