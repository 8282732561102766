"""`--api-auth`: HTTP Basic on the A1111/OpenAI routes, beside the token rules for everything else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import BasicAuth

from nodegraph.server.api_auth import parse_credentials
from tests.server.clients import client_for
from tests.server.stubs import make_engine


@pytest.mark.asyncio
async def test_basic_auth_guards_the_a1111_routes_and_stands_in_for_the_token(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    engine = make_engine(tmp_path, auth_token="secret", api_auth="alice:pw1,bob:pw2")
    client = await client_for(aiohttp_client, engine)
    refused = await client.get("/sdapi/v1/options")
    assert refused.status == 401 and refused.headers["WWW-Authenticate"] == "Basic"
    assert (await client.get("/sdapi/v1/options", auth=BasicAuth("alice", "wrong"))).status == 401
    assert (await client.get("/sdapi/v1/options", auth=BasicAuth("bob", "pw2"))).status == 200
    # Basic credentials open only the A1111/OpenAI routes; the rest still needs the token.
    assert (await client.get("/queue", auth=BasicAuth("bob", "pw2"))).status == 401
    assert (await client.get("/queue", headers={"Authorization": "Bearer secret"})).status == 200


def test_malformed_credentials_are_named() -> None:
    assert parse_credentials("a:b, c:d:e") == {"a": "b", "c": "d:e"}
    with pytest.raises(ValueError, match="'nopassword'"):
        parse_credentials("nopassword")


@pytest.mark.asyncio
async def test_empty_credentials_pass_when_no_api_auth_is_set(aiohttp_client: Any, tmp_path: Path) -> None:
    """SillyTavern sends `Basic base64(auth)` even with no auth set ("Basic "), Open WebUI an empty
    `authorization` header: without --api-auth both are ignored on loopback, as A1111 ignores them."""
    client = await client_for(aiohttp_client, make_engine(tmp_path))
    for header in ("Basic ", ""):
        reply = await client.get("/sdapi/v1/options", headers={"Authorization": header})
        assert reply.status == 200, header
        assert "sd_model_checkpoint" in await reply.json()
