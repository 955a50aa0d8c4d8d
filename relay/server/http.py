"""A small read-only HTTP/1.1 server for the metrics listener (and the directory's pages).

GET and HEAD only, one request per connection (`Connection: close`), request head bounded.
Routes live in `relay.http_routes`: path prefix -> handler(target) -> (status, content_type,
body); the longest matching prefix wins. The handler gets the request target as sent (path
plus any query string); matching uses the path alone. A handler may also be a coroutine
function. Anything else is answered with a plain status: 400, 404, 405, 431, 500, 503, 505.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any

from relay.config import parse_hostport
from relay.log import get_logger

log = get_logger("http")

# RFC 9112 2.3 leaves the length of the request line and header section to the server; 8 KiB
# is what common servers (nginx large_client_header_buffers, h11's 16 KiB) allow and more than
# a scraper or curl ever sends.
MAX_REQUEST_HEAD = 8 * 1024
# A client that sends nothing useful for this long is dropped (slowloris).
READ_TIMEOUT = 10.0
# Connections served at once per listener; beyond it: 503 at once. Scrapers, `relay status`
# and gateways fetching the directory need a handful.
MAX_CONNECTIONS = 64

Response = tuple[int, str, bytes | str]
Handler = Callable[[str], Any]


def route(routes: Mapping[str, Handler], target: str) -> Handler | None:
    """The handler whose prefix is the longest one matching the target's path."""
    path = target.split("?", 1)[0]
    best: str | None = None
    for prefix in routes:
        if path.startswith(prefix) and (best is None or len(prefix) > len(best)):
            best = prefix
    return routes[best] if best is not None else None


def _response(status: int, content_type: str, body: bytes, head_only: bool) -> bytes:
    reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Status"
    head = (f"HTTP/1.1 {status} {reason}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n")
    if status == 405:
        head += "Allow: GET, HEAD\r\n"
    return (head + "\r\n").encode("ascii") + (b"" if head_only else body)


def _plain(status: int, head_only: bool = False) -> bytes:
    return _response(status, "text/plain; charset=utf-8",
                     f"{status} {HTTPStatus(status).phrase}\n".encode(), head_only)


async def handle_request(routes: Mapping[str, Handler], head: bytes) -> bytes:
    """The full response for one request head (request line + headers, CRLFCRLF included)."""
    try:
        request_line = head.split(b"\r\n", 1)[0].decode("ascii")
        method, target, version = request_line.split(" ")
    except (UnicodeDecodeError, ValueError):
        return _plain(400)
    if not version.startswith("HTTP/1."):
        return _plain(505)
    head_only = method == "HEAD"
    if method not in ("GET", "HEAD"):
        return _plain(405)
    if not target.startswith("/"):
        return _plain(400, head_only)
    handler = route(routes, target)
    if handler is None:
        return _plain(404, head_only)
    try:
        result = handler(target)
        if inspect.isawaitable(result):
            result = await result
        status, content_type, body = result
    except Exception as e:
        log.error("http_handler_failed", target=target, error=repr(e), exc_info=e)
        return _plain(500, head_only)
    if isinstance(body, str):
        body = body.encode("utf-8")
    return _response(status, content_type, body, head_only)


async def _serve_one(routes: Mapping[str, Handler], reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
    try:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except asyncio.LimitOverrunError:
            response = _plain(431)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return
        else:
            response = await handle_request(routes, head)
        writer.write(response)
        await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
        if response.startswith(b"HTTP/1.1 431"):
            await _linger(reader, writer)
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After answering without reading the whole request: unread input would make close()
    send RST, which can destroy the answer in flight. Half-close, then swallow a bounded
    amount of what the client still sends (at most 1 s)."""
    writer.write_eof()
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(1.0):
            for _ in range(64):
                if not await reader.read(64 * 1024):
                    break


async def start(routes: Mapping[str, Handler], addrs: list[str] | tuple[str, ...],
                key: str = "metrics.listen") -> list[asyncio.Server]:
    """Serve `routes` on each "HOST:PORT" (port 0 = any free port). `routes` is read at each
    request, so handlers added later (the directory's) are served too."""
    servers = []
    active = [0]          # connections being served, over all of this call's listeners
    for addr in addrs:
        host, port = parse_hostport(addr, key)

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if active[0] >= MAX_CONNECTIONS:
                with contextlib.suppress(ConnectionError):
                    writer.write(_plain(503))
                    await _linger(reader, writer)
                writer.close()
                return
            active[0] += 1
            try:
                await _serve_one(routes, reader, writer)
            finally:
                active[0] -= 1

        servers.append(await asyncio.start_server(on_client, host or None, port,
                                                  limit=MAX_REQUEST_HEAD, reuse_address=True))
    return servers
