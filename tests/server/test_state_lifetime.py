"""The server's parts hold no reference back to the `ServerState`: it goes with its app."""

from __future__ import annotations

import functools
import gc
import types
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web_app
from aiohttp.test_utils import TestClient, TestServer

from nodegraph.server import create_app
from nodegraph.server.state import STATE
from tests.server.stubs import txt2img

pytestmark = pytest.mark.asyncio


def _held(obj: Any) -> Iterator[Any]:
    """What `obj` keeps alive, without walking into modules, classes or a function's globals (each
    leads to the whole program): a closure's cells, a bound method's object, a partial's arguments."""
    if isinstance(obj, (types.ModuleType, type)):
        return
    if isinstance(obj, types.FunctionType):
        yield from (cell.cell_contents for cell in obj.__closure__ or () if cell.cell_contents is not None)
        yield from obj.__defaults__ or ()
        return
    if isinstance(obj, types.MethodType):
        yield obj.__self__
        return
    if isinstance(obj, functools.partial):
        yield obj.func
        yield from obj.args
        yield from obj.keywords.values()
        return
    yield from gc.get_referents(obj)


def _reaches(start: Any, target: Any) -> bool:
    seen: set[int] = set()
    todo = [start]
    while todo:
        obj = todo.pop()
        if obj is target:
            return True
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        todo.extend(_held(obj))
    return False


async def test_no_part_of_the_server_refers_back_to_its_state(engine: Any) -> None:
    st = create_app(engine)[STATE]
    assert _reaches(st, st.worker)  # the walk follows what the state holds
    for part in (st.hub, st.worker, st.wake, st.store):
        assert not _reaches(part, st), f"{type(part).__name__} keeps the ServerState alive"


async def test_the_state_is_freed_once_its_app_has_shut_down(engine: Any) -> None:
    app = create_app(engine)
    state = weakref.ref(app[STATE])
    client = TestClient(TestServer(app))
    await client.start_server()
    reply = await client.post("/prompt?wait=true", json={"prompt": txt2img()})
    assert reply.status == 200 and "outputs" in await reply.json()  # the worker woke the waiter
    await client.close()
    # aiohttp memoises each route's middleware chain with the apps it ran in (an lru_cache of 1,024
    # entries), which keeps any app that served a request alive; that cache is aiohttp's, not ours.
    web_app._cached_build_middleware.cache_clear()
    del app, client, reply
    gc.collect()
    assert state() is None
