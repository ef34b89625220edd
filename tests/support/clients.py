"""End-to-end fixtures: a real server per database engine, and real matrix-nio clients.

Use ``matrix_server`` (module scope, parametrized over SQLite and PostgreSQL)
and ``await register(server, "alice")`` to get a logged-in ``nio.AsyncClient``.
``await call(server, client, "GET", path)`` covers what nio has no method for.
"""

import asyncio
import uuid
from contextlib import ExitStack
from typing import Any

import aiohttp
import pytest
from nio import (
    AsyncClient,
    JoinError,
    RegisterResponse,
    RoomCreateResponse,
    RoomPreset,
    RoomVisibility,
)

from tests.support.postgres import throwaway_database
from tests.support.server import RunningServer, start_server

CLIENT = "/_matrix/client/v3"
NO_LIMIT = {"per_second": 10000, "burst_count": 10000}

# Configuration of end-to-end test servers: open registration, no rate limits
# (tests of rate limiting start their own server with limits).
E2E_CONFIG: dict[str, Any] = {
    "enable_registration": True,
    "enable_registration_without_verification": True,
    "rc_message": NO_LIMIT,
    "rc_registration": NO_LIMIT,
    "rc_login": {"address": NO_LIMIT, "account": NO_LIMIT, "failed_attempts": NO_LIMIT},
    "rc_joins": {"local": NO_LIMIT, "remote": NO_LIMIT},
    "rc_joins_per_room": NO_LIMIT,
    "rc_invites": {"per_room": NO_LIMIT, "per_user": NO_LIMIT, "per_issuer": NO_LIMIT},
}


def start_e2e_server(stack: ExitStack, directory: Any, engine: str, **config: Any) -> RunningServer:
    settings = {**E2E_CONFIG, **config}
    if engine == "psycopg":
        settings["database"] = {"name": "psycopg",
                                "args": stack.enter_context(throwaway_database())}
    server = start_server(directory, **settings)
    stack.callback(server.stop)
    return server


@pytest.fixture(scope="module", params=["sqlite3", "psycopg"])
def matrix_server(request: Any, tmp_path_factory: Any) -> Any:
    """A running server for the module, once on SQLite and once on PostgreSQL."""
    with ExitStack() as stack:
        directory = tmp_path_factory.mktemp(f"hs-{request.param}")
        yield start_e2e_server(stack, directory, request.param)


def unique(prefix: str = "u") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


async def register(server: RunningServer, localpart: str | None = None,
                   password: str = "correct horse battery") -> AsyncClient:
    """A new account, logged in, as a real matrix-nio client."""
    client = AsyncClient(server.base_url, "")
    response = await client.register(localpart or unique(), password)
    if not isinstance(response, RegisterResponse):
        await client.close()
        raise AssertionError(f"registration failed: {response}")
    return client


async def call(server: RunningServer, client: AsyncClient | None, method: str, path: str,
               body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    """A raw request (with the client's token) for endpoints nio lacks."""
    headers = {"Authorization": f"Bearer {client.access_token}"} if client else {}
    async with aiohttp.ClientSession() as session:
        kwargs: dict[str, Any] = {"headers": headers}
        if raw is not None:
            kwargs["data"] = raw
        elif body is not None:
            kwargs["json"] = body
        async with session.request(method, server.base_url + path, **kwargs) as response:
            try:
                data = await response.json(content_type=None)
            except ValueError:
                data = await response.text()
            return response.status, data


def run(coro: Any, timeout: float = 60) -> Any:
    """Run a test's coroutine, failing it (not hanging) after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def shared_room(*clients: AsyncClient) -> str:
    """A room the first client creates and invites the others to; they all join."""
    creator, *others = clients
    response = await creator.room_create(invite=[c.user_id for c in others])
    assert isinstance(response, RoomCreateResponse), response
    for client in others:
        assert not isinstance(await client.join(response.room_id), JoinError)
    return response.room_id


async def close(*clients: AsyncClient) -> None:
    await asyncio.gather(*(c.close() for c in clients))


async def create(client, **kwargs) -> str:
    """nio's room_create with the spec's argument names."""
    if "visibility" in kwargs:
        kwargs["visibility"] = RoomVisibility(kwargs["visibility"])
    if "preset" in kwargs:
        kwargs["preset"] = RoomPreset(kwargs["preset"])
    if "power_level_content_override" in kwargs:
        kwargs["power_level_override"] = kwargs.pop("power_level_content_override")
    response = await client.room_create(**kwargs)
    assert isinstance(response, RoomCreateResponse), response
    return response.room_id


async def say(client, room_id, body="hi"):
    return await client.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body})
