"""Bounds on a front's HTTP connections, enforced before a request reaches the app (or its token check).

uvicorn on its own times out only a connection kept alive after a response: a connection that never
sends a request, or sends its headers or body a byte now and then (slowloris), stays open forever;
nothing bounds how many connections a front holds (each one a file descriptor, so a thousand silent
ones can leave none for honest clients); and its httptools parser keeps a header of any size in
memory. :func:`guarded_protocol` makes a subclass of uvicorn's HTTP protocol (httptools where it is
installed, else h11) that adds, per front process (``ConnectionLimits`` from ``SandboxConfig``):

- **idle timeout** (``--idle-timeout``): a connection with no request in progress, new or kept alive
  after a response, is closed after this long;
- **header timeout** (``--header-timeout``): from a request's first byte to the end of its headers;
  past it, 408 and close;
- **body timeout** (``--body-timeout``): from the end of the headers to the end of the body; 408;
- **header size** (``--max-header-kb``, 64 KiB): the request line and headers together, counted as
  the bytes arrive and before the parser keeps them, blank lines before the request line included (the
  parser skips them); past it, 431 (the rest is read and dropped for a moment, so that the client sees
  the answer, then the connection is closed). A chunked body's trailers are headers too, which the
  parser keeps: what a body sends beyond its own bytes (chunk framing and trailers) is bounded by the
  same limit plus half the body's size (431 past it);
- **an answer the client does not read** (writing paused by back-pressure) for longer than the body
  timeout: the connection is dropped, and the answer with it;
- **a bound on open connections** (``--max-connections``; by default what the descriptor limit allows,
  which the front first raises to its hard limit): a connection past it sheds the oldest connection
  that is idle, or else the oldest still sending its request (503); a connection whose request has
  been read (queued, running or being answered) is never shed. A new connection finds no room only
  when every other one is such a request: it gets 503.

Not covered: HTTP/2 and TLS (the server speaks neither); many clients that each stay within these
limits (they are requests like any other: the queue bound, ``--max-queue``, answers 503 past it); a
flood so fast that the newest connections are shed before they send their first bytes; pipelined
requests are served, but the head of one that starts inside the same read as the end of the one
before is not counted (a read is at most a few hundred KiB).
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections import OrderedDict
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

LINGER_S = 2.0  # after a refusal: how long the rest of the request is read and dropped before closing
_IDLE, _HEAD, _BODY, _BUSY, _CLOSING = "idle", "head", "body", "busy", "closing"


@dataclass(frozen=True)
class ConnectionLimits:
    idle_timeout: float = 30.0
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_header_bytes: int = 64 << 10
    max_connections: int = 4096
    # also: how long writing an answer may stay paused because the client does not read it
    # (body_timeout above)


def descriptor_budget(reserve: int) -> int:
    """Raise this process's soft descriptor limit to its hard one (up to 65,536) and return how many
    connections fit in it with ``reserve`` descriptors to spare for everything else."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    soft = 1 << 16 if soft == resource.RLIM_INFINITY else soft
    return max(16, soft - reserve)


def _head_end(buf: bytes) -> int:
    """Index just past the end of an HTTP head in ``buf`` (a blank line), or -1."""
    ends = [i + 4 for i in (buf.find(b"\r\n\r\n"),) if i >= 0] + [i + 2 for i in (buf.find(b"\n\n"),) if i >= 0]
    return min(ends) if ends else -1


class _Registry:
    """A front's connections in the order they may be shed, and a sweeper for their deadlines."""

    def __init__(self, limits: ConnectionLimits):
        self.limits = limits
        self.count = 0
        self.idle: OrderedDict[Any, None] = OrderedDict()  # oldest first: by when each became idle
        self.reading: OrderedDict[Any, None] = OrderedDict()  # oldest first: by when its request began
        self.closing: OrderedDict[Any, None] = OrderedDict()
        self.stalled: OrderedDict[Any, None] = OrderedDict()  # writing paused: the client does not read
        self.tick = max(0.05, min(1.0, limits.idle_timeout / 4, limits.header_timeout / 4, limits.body_timeout / 4))
        self.sweeper: asyncio.TimerHandle | None = None

    def place(self, conn: Any, phase: str) -> None:
        for group in (self.idle, self.reading, self.closing):
            group.pop(conn, None)
        if phase == _IDLE:
            self.idle[conn] = None
        elif phase in (_HEAD, _BODY):
            self.reading[conn] = None
        elif phase == _CLOSING:
            self.closing[conn] = None

    def admit(self, conn: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.count += 1
        self.place(conn, _IDLE)
        if self.sweeper is None:
            self.sweeper = loop.call_later(self.tick, self.sweep, loop)
        if self.count <= self.limits.max_connections:
            return
        # make room: a refused connection still being drained, else the oldest idle one, else the
        # oldest still sending its request; when every other connection carries a request, this one goes
        idle = next(iter(self.idle))
        victim = next(iter(self.closing), None) or (idle if idle is not conn else next(iter(self.reading), conn))
        victim.shed(newcomer=victim is conn)

    def leave(self, conn: Any) -> None:
        self.count -= 1
        self.place(conn, "")
        self.stalled.pop(conn, None)

    def sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = time.monotonic()
        for conn in list(self.idle):  # in deadline order
            if conn.deadline > now:
                break
            conn.expire()
        for conn in [c for c in list(self.reading) + list(self.closing) if c.deadline <= now]:
            conn.expire()
        for conn in [c for c in self.stalled if c.write_deadline <= now]:
            self.stalled.pop(conn, None)
            conn.transport.abort()  # no answer can reach a client that does not read: drop it all
        self.sweeper = loop.call_later(self.tick, self.sweep, loop)


class _Guard:
    """Mixed in before uvicorn's protocol class; the hooks below are called by the subclasses."""

    registry: _Registry  # one per front: set on the class that guarded_protocol makes

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self.phase, self.in_message, self.counting, self.head, self.tail = _IDLE, False, False, 0, b""
        self.started, self.after_head, self.body_bytes = False, 0, 0
        self.write_deadline = float("inf")
        self.deadline = time.monotonic() + self.registry.limits.idle_timeout
        self.registry.admit(self, self.loop)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.leave(self)
        super().connection_lost(exc)  # type: ignore[misc]

    def _to(self, phase: str, timeout: float | None = None) -> None:
        self.phase = phase
        self.deadline = time.monotonic() + timeout if timeout is not None else float("inf")
        self.registry.place(self, phase)

    def data_received(self, data: bytes) -> None:
        if self.phase == _CLOSING:
            return  # the rest of a refused request: dropped
        self._message_begins()
        limit = self.registry.limits.max_header_bytes
        if self.counting:
            buf = self.tail + data
            if not self.started:
                # the parser skips blank lines before the request line: so does the search for the
                # blank line that ends the head (else it would end here), but they count
                rest = buf.lstrip(b"\r\n")
                self.head += len(buf) - len(rest)
                buf, self.started = rest, bool(rest)
            end = _head_end(buf) if buf else -1
            self.head += (end if end >= 0 else len(buf)) - len(self.tail)
            if self.head > limit:
                self.refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                            f"request headers over the server's limit of {limit} bytes (--max-header-kb)")
                return
            self.counting, self.tail = end < 0, buf[-3:]
            if end >= 0:
                self.after_head += len(buf) - end
        elif self.in_message:
            self.after_head += len(data)
        super().data_received(data)  # type: ignore[misc]
        # past the head, what is not body (chunk framing, and the trailers, which the parser keeps as
        # headers) is bounded too: by the header limit and half the body (chunks of a few bytes each)
        if self.in_message and not self.counting and self.phase != _CLOSING and self.counts_body:
            if self.after_head - self.body_bytes > limit + self.body_bytes // 2:
                self.refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                            f"chunk framing and trailers over the server's limit of {limit} bytes (--max-header-kb)")

    counts_body = False  # whether the parser reports a body's bytes (on_body) as it decodes them

    # -- an answer the client does not read ---------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        self.write_deadline = time.monotonic() + self.registry.limits.body_timeout
        self.registry.stalled[self] = None

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        self.write_deadline = float("inf")
        self.registry.stalled.pop(self, None)

    # -- where a request stands (called from the parser's callbacks) ---------------------------------

    def _message_begins(self) -> None:
        if self.in_message:
            return
        self.in_message, self.counting, self.head, self.tail = True, True, 0, b""
        self.started, self.after_head, self.body_bytes = False, 0, 0
        if self.phase == _IDLE:
            self._to(_HEAD, self.registry.limits.header_timeout)

    def _headers_done(self) -> None:
        self.counting = False
        if self.phase == _HEAD:
            self._to(_BODY, self.registry.limits.body_timeout)

    def _message_done(self) -> None:
        self.in_message = False
        if self.phase in (_HEAD, _BODY):
            self._to(_BUSY)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if self.phase == _CLOSING or self.transport.is_closing():  # type: ignore[attr-defined]
            return
        cycle = getattr(self, "cycle", None)
        if cycle is not None and not cycle.response_complete:
            self._to(_BUSY)  # a pipelined request has started
        elif self.in_message:  # answered before its body was all read (413): the body still arrives
            self._to(_BODY if not self.counting else _HEAD, self.registry.limits.body_timeout)
        else:
            self._to(_IDLE, self.registry.limits.idle_timeout)

    # -- ending a connection ------------------------------------------------------------------------

    def expire(self) -> None:
        """Its deadline passed: an idle connection is closed, a slow request answered 408."""
        if self.phase in (_IDLE, _CLOSING):
            self.transport.close()  # type: ignore[attr-defined]
        else:
            self.refuse(HTTPStatus.REQUEST_TIMEOUT, "the request was not received in time "
                        "(--header-timeout, --body-timeout)")

    def shed(self, newcomer: bool = False) -> None:
        """Close now, to make room for a new connection (or as the new one, when there is none): 503
        first to one that began a request, or is turned away."""
        if newcomer or self.phase in (_HEAD, _BODY):
            self.refuse(HTTPStatus.SERVICE_UNAVAILABLE, "too many open connections; retry later")
        self.transport.close()  # type: ignore[attr-defined]
        self.registry.place(self, "")  # gone once the loop gets to it: not a candidate again meanwhile

    def refuse(self, status: HTTPStatus, message: str) -> None:
        """Answer ``status`` and close, after reading (and dropping) the rest for a moment."""
        transport = self.transport  # type: ignore[attr-defined]
        if self.phase == _CLOSING or transport.is_closing():
            return
        cycle = getattr(self, "cycle", None)
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's request ends here: it is told so, and cannot answer
            cycle.message_event.set()
        elif cycle is not None and self.in_message and not self.counting:
            transport.close()  # this request was answered already (413 before its body was all read)
            self.registry.place(self, "")
            return
        body = json.dumps({"detail": message}).encode()
        transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                        b"connection: close\r\n%s\r\n%s" % (status.value, status.phrase.encode(), len(body),
                                                            b"retry-after: 1\r\n" if status == 503 else b"", body))
        if transport.can_write_eof():
            transport.write_eof()
        self.phase, self.deadline = _CLOSING, time.monotonic() + LINGER_S
        self.registry.place(self, _CLOSING)


def guarded_protocol(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (httptools where installed, else h11) with ``limits`` enforced;
    one class per front, which holds that front's connections."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        HttpToolsProtocol = None  # noqa: N806

    if HttpToolsProtocol is not None:
        class Guarded(_Guard, HttpToolsProtocol):
            counts_body = True

            def on_body(self, body: bytes) -> None:
                self.body_bytes += len(body)
                super().on_body(body)

            def on_message_begin(self) -> None:
                self._message_begins()
                super().on_message_begin()

            def on_headers_complete(self) -> None:
                self._headers_done()
                super().on_headers_complete()

            def on_message_complete(self) -> None:
                self._message_done()
                super().on_message_complete()
    else:
        import h11
        from uvicorn.protocols.http.h11_impl import H11Protocol

        class Guarded(_Guard, H11Protocol):  # type: ignore[no-redef]
            def data_received(self, data: bytes) -> None:
                super().data_received(data)
                state = self.conn.their_state
                if state is h11.SEND_BODY:
                    self._headers_done()
                elif state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
                    self._headers_done()
                    self._message_done()

    Guarded.registry = _Registry(limits)
    return Guarded
