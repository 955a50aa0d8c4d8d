"""The metrics listener's HTTP server: real clients (curl, raw sockets) over loopback."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

from relay.server import http


async def _serve(routes: dict[str, Any], fn: Callable[[int], Awaitable[Any]]) -> Any:
    servers = await http.start(routes, ["127.0.0.1:0"])
    port = servers[0].sockets[0].getsockname()[1]
    try:
        return await fn(port)
    finally:
        for s in servers:
            s.close()
            await s.wait_closed()


async def _curl(*args: str) -> str:
    p = await asyncio.create_subprocess_exec("curl", "-s", "-i", "--max-time", "10", *args,
                                             stdout=subprocess.PIPE)
    out, _ = await asyncio.wait_for(p.communicate(), 15)
    return out.decode()


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return out


def _routes() -> dict[str, Any]:
    async def slow(target: str) -> tuple[int, str, str]:
        await asyncio.sleep(0)
        return 200, "text/plain", f"async {target}"

    def broken(target: str) -> tuple[int, str, bytes]:
        raise RuntimeError("boom")

    return {
        "/a/": lambda t: (200, "text/plain", f"short {t}"),
        "/a/b/": lambda t: (200, "text/plain", f"long {t}"),
        "/async": slow,
        "/broken": broken,
    }


def test_longest_prefix_wins_and_query_is_passed_on() -> None:
    async def run(port: int) -> None:
        out = await _curl(f"http://127.0.0.1:{port}/a/b/c?x=1")
        assert out.startswith("HTTP/1.1 200 OK\r\n")
        assert out.endswith("\r\n\r\nlong /a/b/c?x=1")
        assert "Content-Length: 15\r\n" in out
        assert (await _curl(f"http://127.0.0.1:{port}/a/x")).endswith("short /a/x")
        assert (await _curl(f"http://127.0.0.1:{port}/async")).endswith("async /async")

    asyncio.run(_serve(_routes(), run))


def test_head_has_length_but_no_body() -> None:
    async def run(port: int) -> None:
        out = await _raw(port, b"HEAD /a/b/c HTTP/1.1\r\nHost: x\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Content-Length: 11\r\n" in out
        assert out.endswith(b"\r\n\r\n")

    asyncio.run(_serve(_routes(), run))


def test_errors_get_plain_statuses() -> None:
    async def run(port: int) -> None:
        assert (await _curl(f"http://127.0.0.1:{port}/nothing")).startswith("HTTP/1.1 404 ")
        post = await _curl("-X", "POST", "-d", "x", f"http://127.0.0.1:{port}/a/")
        assert post.startswith("HTTP/1.1 405 ") and "Allow: GET, HEAD\r\n" in post
        assert (await _curl(f"http://127.0.0.1:{port}/broken")).startswith("HTTP/1.1 500 ")
        assert (await _raw(port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        assert (await _raw(port, b"GET /a/ HTTP/2.0\r\n\r\n")).startswith(b"HTTP/1.1 505 ")
        assert (await _raw(port, b"GET a HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 400 ")

    asyncio.run(_serve(_routes(), run))


def test_request_head_is_bounded() -> None:
    async def run(port: int) -> None:
        huge = b"GET /a/ HTTP/1.1\r\nX-Pad: " + b"x" * (http.MAX_REQUEST_HEAD * 4) + b"\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(huge)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        out = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert out.startswith(b"HTTP/1.1 431 ")

    asyncio.run(_serve(_routes(), run))


def test_routes_added_after_start_are_served() -> None:
    routes: dict[str, Any] = {}

    async def run(port: int) -> None:
        assert (await _curl(f"http://127.0.0.1:{port}/late")).startswith("HTTP/1.1 404 ")
        routes["/late"] = lambda t: (200, "text/plain", b"here")
        assert (await _curl(f"http://127.0.0.1:{port}/late")).endswith("\r\n\r\nhere")

    asyncio.run(_serve(routes, run))


def test_connections_are_bounded() -> None:
    async def run(port: int) -> None:
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(http.MAX_CONNECTIONS)]
        await asyncio.sleep(0.1)
        assert (await _raw(port, b"GET /a/ HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 503 ")
        for _, w in idle[:1]:
            w.close()
        await asyncio.sleep(0.1)
        assert (await _raw(port, b"GET /a/ HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        for _, w in idle[1:]:
            w.close()

    asyncio.run(_serve(_routes(), run))
