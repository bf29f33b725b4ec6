"""Who may use the web page and the HTTP API, and from which page.

Checked for every request, in this order (docs/http-api.md, "Who may use it"):
1. the peer's address is in `--http-allow` (default: this machine only);
2. the Host header names this machine (an IP address, localhost, its host
   name) unless a token is set: a foreign site whose name is made to point at
   this server (DNS rebinding) would otherwise be "same-origin" with it;
3. a POST or DELETE from a browser comes from this server's own page (its
   Origin, or Referer, is the request's own host) or from the `--http-cors`
   origin;
4. with `--http-token`, /api/* and /v1/* need `Authorization: Bearer TOKEN` or
   the session cookie that POST /api/login sets.
CORS headers are sent for the `--http-cors` origin only. The address seen is
the socket's peer: X-Forwarded-For is not trusted.
"""

import hashlib
import hmac
import ipaddress
import secrets
import socket
from typing import Optional, Set, Union

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from yarl import URL

from ..settings import HttpSettings
from .errors import ApiError

SESSION_COOKIE = "chatterbox_session"
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# Paths that need the token (when one is set); the page and its files do not
# (they show the login form), nor does the login itself or /health.
PROTECTED_PREFIXES = ("/api/", "/v1/")
OPEN_PATHS = {"/api/login", "/api/logout"}
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"


def _address(
    text: Optional[str],
) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def _host_port(url: URL) -> tuple:
    return ((url.host or "").lower().rstrip("."), url.port)


class Access:
    """The rules above, built once from the settings."""

    def __init__(self, settings: HttpSettings, tls: bool) -> None:
        self.networks = settings.allowed_networks()
        self.token = settings.http_token
        self.cors = settings.cors_origin()
        self.tls = tls
        # The cookie holds a keyed hash of the token, valid until a restart.
        self._key = secrets.token_bytes(32)
        self.host_names = self._own_names()

    @property
    def token_required(self) -> bool:
        return self.token is not None

    def _own_names(self) -> Set[str]:
        names = {"localhost"}
        host = socket.gethostname().lower().rstrip(".")
        if host:
            short = host.split(".", 1)[0]
            names |= {host, short, f"{short}.local"}
        if self.cors is not None:
            names.add(_host_port(URL(self.cors))[0])
        return names

    # --- the checks ---

    def peer_allowed(self, remote: Optional[str]) -> bool:
        address = _address(remote)
        return address is not None and any(
            address.version == network.version and address in network
            for network in self.networks
        )

    def host_allowed(self, request: web.Request) -> bool:
        if self.token is not None:
            return True  # a rebinding page has no token
        host = (request.url.host or "").lower().rstrip(".")
        if _address(host.strip("[]")) is not None:
            return True
        return host in self.host_names or host.endswith(".localhost")

    def origin_allowed(self, request: web.Request) -> bool:
        """A browser's POST/DELETE must come from this server's page (or the
        --http-cors origin); clients that send neither header are no browser."""
        origin = request.headers.get("Origin")
        if origin is None:
            referer = request.headers.get("Referer")
            if referer is None:
                return True
            origin = str(URL(referer).origin()) if URL(referer).host else "null"
        if origin == "null":
            return False
        if self.cors is not None and origin == self.cors:
            return True
        try:
            return _host_port(URL(origin)) == _host_port(request.url)
        except ValueError:
            return False

    def authorised(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and self.token_matches(given.strip()):
            return True
        cookie = request.cookies.get(SESSION_COOKIE, "")
        return bool(cookie) and hmac.compare_digest(cookie, self._session())

    def token_matches(self, given: str) -> bool:
        assert self.token is not None
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _session(self) -> str:
        assert self.token is not None
        return hmac.new(self._key, self.token.encode(), hashlib.sha256).hexdigest()

    def set_session(self, response: web.StreamResponse) -> None:
        """The cookie that stands for the token in the browser (HttpOnly)."""
        response.set_cookie(
            SESSION_COOKIE,
            self._session(),
            httponly=True,
            samesite="Strict",
            secure=self.tls,
            path="/",
        )

    # --- the middleware ---

    def check(self, request: web.Request) -> None:
        """Raise ApiError (403, 401) for a request that may not go on."""
        if not self.peer_allowed(request.remote):
            raise ApiError(
                403,
                f"Your address {request.remote} may not use this server; its "
                "owner can add your network with --http-allow",
                "address_not_allowed",
            )
        if not self.host_allowed(request):
            raise ApiError(
                403,
                f"This server does not answer to the name {request.url.host!r}: "
                "open it by its IP address or host name, or set --http-token",
                "host_not_allowed",
            )
        if request.method in UNSAFE_METHODS and not self.origin_allowed(request):
            raise ApiError(
                403,
                "Cross-site request refused: this server takes requests only from "
                "its own page (or the --http-cors origin)",
                "cross_site",
            )
        path = request.path
        if (
            path.startswith(PROTECTED_PREFIXES)
            and path not in OPEN_PATHS
            and not self.authorised(request)
        ):
            raise ApiError(
                401,
                "A token is needed: log in on the page, or send "
                "'Authorization: Bearer TOKEN'",
                "invalid_token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def cors_headers(self, request: web.Request) -> dict:
        if self.cors is None or request.headers.get("Origin") != self.cors:
            return {}
        return {"Access-Control-Allow-Origin": self.cors, "Vary": "Origin"}

    def middleware(
        self,
    ) -> Middleware:
        @web.middleware
        async def access(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.method == "OPTIONS":
                return self._preflight(request)
            self.check(request)
            return await handler(request)

        return access

    async def on_prepare(
        self, request: web.Request, response: web.StreamResponse
    ) -> None:
        """Headers for every answer, streamed ones too (aiohttp's
        on_response_prepare): CORS for the --http-cors origin; no framing by
        other sites (clickjacking "Delete voice"), no type sniffing."""
        response.headers.update(self.cors_headers(request))
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Content-Security-Policy", "frame-ancestors 'none'")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")

    def _preflight(self, request: web.Request) -> web.StreamResponse:
        if not self.peer_allowed(request.remote):
            raise ApiError(403, "Address not allowed", "address_not_allowed")
        cors = self.cors_headers(request)
        if not cors:
            raise ApiError(403, "No cross-origin requests allowed", "cross_site")
        headers = {
            **cors,
            "Access-Control-Allow-Methods": CORS_METHODS,
            "Access-Control-Allow-Headers": CORS_HEADERS,
            "Access-Control-Max-Age": "600",
        }
        return web.Response(status=204, headers=headers)
