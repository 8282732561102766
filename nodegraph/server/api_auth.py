"""`--api-auth user:password[,user2:password2]`: HTTP Basic auth for the A1111 and OpenAI routes,
as A1111's flag of the same name gives. Those clients send Basic credentials and no bearer token,
so on those routes valid credentials stand in for the token; every other route keeps the token
rules. Without the flag nothing changes.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
API_PREFIXES = ("/sdapi/", "/api/sdapi/", "/v1/images/", "/api/v1/images/")


def parse_credentials(value: str) -> dict[str, str]:
    """`user:password` pairs, comma-separated; raises ValueError naming a malformed one."""
    pairs = {}
    for item in (v.strip() for v in value.split(",")):
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api-auth: expected user:password, got {item!r}")
        pairs[user] = password
    return pairs


def _basic_ok(request: web.Request, credentials: dict[str, str]) -> bool:
    header = request.headers.get("Authorization", "")
    if not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
    except ValueError:  # binascii.Error, UnicodeDecodeError, and non-ASCII text in the header
        return False
    expected = credentials.get(user)
    return expected is not None and hmac.compare_digest(password.encode(), expected.encode())


def with_api_auth(inner: Middleware, credentials: dict[str, str], token_required: bool) -> Middleware:
    """`inner` (the token or loopback-Host check) for every route but the API ones, which need Basic
    credentials instead of the token (the Host check, when there is no token, still applies)."""

    @web.middleware
    async def api_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(API_PREFIXES):
            return await inner(request, handler)
        if not _basic_ok(request, credentials):
            body = {"detail": "Incorrect username or password", "error": "unauthorized"}
            return web.json_response(body, status=401, headers={"WWW-Authenticate": "Basic"})
        return await (handler(request) if token_required else inner(request, handler))

    return api_auth
