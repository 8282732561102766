"""Access token and cross-site checks, as aiohttp middlewares.

Safe by default: on a loopback address no token is needed (unless one was given); on any other
address every HTTP and websocket request needs the token, as `Authorization: Bearer <token>`,
`?token=<token>`, or the cookie that a browser gets by opening any page once with `?token=`.
State-changing requests and websocket upgrades whose `Origin` names another host than `Host` are
refused, so a web page elsewhere cannot queue prompts or read previews from a local server.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

COOKIE = "nodegraph_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# RFC 9110's Host: a DNS name or IPv4 address, or an IPv6 literal in brackets, then an optional port.
# Nothing else (userinfo, paths, spaces, non-ASCII, lists): such a value is a 400 on every route,
# so no parser's reading of it can pick a loopback name out of it.
_HOST = re.compile(
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]{2,45})\]|(?P<name>[A-Za-z0-9_.-]{1,253}))(?::(?P<port>[0-9]{1,5}))?"
)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def parse_host(value: str) -> tuple[str, int | None] | None:
    """(lowercase name or address, without brackets; port or None) of a `Host` value; None if malformed."""
    found = _HOST.fullmatch(value)
    if found is None:
        return None
    port = int(found["port"]) if found["port"] is not None else None
    if port is not None and not 0 < port < 65536:
        return None
    if found["ipv6"] is not None:
        try:
            return str(ipaddress.IPv6Address(found["ipv6"])), port
        except ValueError:
            return None
    return found["name"].lower(), port


def host_header(request: web.Request) -> str | None:
    """The request's `Host` header as sent (None without one: HTTP/1.0). Never `request.host`,
    which falls back to a DNS lookup of this machine's name on the event loop."""
    return request.headers.get("Host")


def _bad_host(value: str) -> web.Response:
    return web.json_response(
        {
            "error": {
                "type": "bad_host",
                "message": f"malformed Host header {value[:100]!r}",
                "details": "send the server's address as Host: name[:port], IPv4[:port] or [IPv6][:port]",
                "extra_info": {},
            }
        },
        status=400,
    )


@web.middleware
async def host_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: a malformed `Host` is a 400 before any check reads it (aiohttp refuses a repeated one)."""
    host = host_header(request)
    if host is not None and parse_host(host) is None:
        return _bad_host(host)
    return await handler(request)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def effective_token(listen: str, configured: str | None) -> str | None:
    """The token to require: the configured one, else a new one unless every listen address is loopback."""
    if configured:
        return configured
    hosts = [h.strip() for h in listen.split(",") if h.strip()] or ["127.0.0.1"]
    if all(is_loopback(h) for h in hosts):
        return None
    return secrets.token_urlsafe(24)


def _presented(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.query.get("token") or request.cookies.get(COOKIE)


def token_middleware(token: str) -> Middleware:
    """Refuse every request without the token (401), set the cookie when it came in the query."""

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = _presented(request)
        # bytes that are not UTF-8 reach us as lone surrogates: compared as the bytes that came
        if given is None or not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode()):
            return web.json_response(
                {
                    "error": {
                        "type": "unauthorized",
                        "message": "this server needs its access token",
                        "details": "send 'Authorization: Bearer <token>' or open the page once with "
                        "?token=<token>; the token is printed when the server starts",
                        "extra_info": {},
                    }
                },
                status=401,
            )
        response = await handler(request)
        if request.query.get("token") and not response.prepared:
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict")
        return response

    return check_token


def _port(scheme: str, port: int | None) -> int | None:
    if port is not None:
        return port
    return {"http": 80, "https": 443, "ws": 80, "wss": 443}.get(scheme)


def same_origin(origin: str, host: str | None, request_scheme: str) -> bool:
    """Whether an `Origin` header names the host (and port) the request was sent to."""
    if not origin or origin == "null" or host is None:
        return False
    target = parse_host(host)
    try:
        o = urlsplit(origin)
        origin_port = _port(o.scheme, o.port)
    except ValueError:
        return False
    if target is None or o.username is not None or o.password is not None:
        return False
    return (o.hostname or "").lower() == target[0] and origin_port == _port(request_scheme, target[1])


def _forbidden_origin(request: web.Request, origin: str) -> web.Response:
    return web.json_response(
        {
            "error": {
                "type": "forbidden_origin",
                "message": f"origin {origin!r} refused: not this server ({host_header(request)})",
                "details": "open the canvas from this server's own address",
                "extra_info": {},
            }
        },
        status=403,
    )


def origin_check(allowed: str | None = None) -> Middleware:
    """403 for cross-site state changes and websocket upgrades (an absent Origin is a script: allowed).

    Args:
        allowed: one more origin to accept (`--enable-cors-header ORIGIN`), `*` for any.
    """

    @web.middleware
    async def check_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
        is_upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if request.method not in SAFE_METHODS or is_upgrade:
            origin = request.headers.get("Origin")
            if (
                origin is not None
                and not same_origin(origin, host_header(request), request.scheme)
                and not cors_allows(allowed, origin)
            ):
                return _forbidden_origin(request, origin)
        return await handler(request)

    return check_origin


origin_middleware = origin_check(None)


@web.middleware
async def loopback_host_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Without a token, only loopback `Host` names are served: a DNS-rebinding page (evil.example
    resolved to 127.0.0.1) sends its own name as Host and is refused before it can read anything."""
    host = host_header(request)
    parsed = parse_host(host) if host is not None else None
    if parsed is None or not is_loopback(parsed[0]):
        return web.json_response(
            {
                "error": {
                    "type": "forbidden_host",
                    "message": f"host {host!r} is not this machine's loopback address",
                    "details": "open the server as http://127.0.0.1:<port>/ or http://localhost:<port>/",
                    "extra_info": {},
                }
            },
            status=403,
        )
    return await handler(request)


def cors_allows(allowed: str | None, origin: str | None) -> bool:
    """Whether `origin` is the one `--enable-cors-header` named (`*`: any)."""
    if not allowed or not origin:
        return False
    return allowed == "*" or origin.rstrip("/").lower() == allowed.rstrip("/").lower()


def cors_middleware(allowed: str) -> Middleware:
    """ComfyUI's `--enable-cors-header [ORIGIN]`: CORS headers for that origin (`*` = any) only.

    Outermost, so a preflight from the allowed origin is answered before the token check (a browser
    never sends credentials on a preflight). Requests from any other origin get no CORS headers and
    still meet the Origin check (`origin_check(allowed)`), which lets only the allowed one through.
    """

    @web.middleware
    async def add_cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if not cors_allows(allowed, origin):
            return await handler(request)
        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
            response: web.StreamResponse = web.Response(status=200)
        else:
            response = await handler(request)
        response.headers["Access-Control-Allow-Origin"] = "*" if allowed == "*" else str(origin)
        response.headers["Access-Control-Allow-Methods"] = "POST, GET, DELETE, PUT, OPTIONS, PATCH"
        response.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization"
        if allowed != "*":  # browsers refuse credentials with a wildcard origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Vary"] = "Origin"
        return response

    return add_cors
