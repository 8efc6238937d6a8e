"""A TCP proxy in a background thread, to cut a service off without touching the service itself.

``down()`` closes the listener (new connections are refused) and resets every open connection: from the
client's side that is a database server that stopped; ``up()`` listens again on the same port. ``stall()``
stops forwarding in both directions but keeps every socket open and still accepts connections (held, not
forwarded): a hung server or a network that drops packets without resetting anything; ``resume()`` lets
everything held flow again. Tests use it in front of the shared Postgres server so that an outage does not
disturb anyone else's connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import Future


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port``. Use ``start()`` / ``close()``."""

    def __init__(self, target_host: str, target_port: int, port: int) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing: asyncio.Event | None = None  # made on the proxy's loop; cleared while stalled

    def start(self) -> TcpProxy:
        self._thread.start()
        self.up()
        return self

    def up(self) -> None:
        self._call(self._listen())

    def down(self) -> None:
        self._call(self._cut())

    def stall(self) -> None:
        self._call(self._set_flowing(False))

    def resume(self) -> None:
        self._call(self._set_flowing(True))

    async def _set_flowing(self, flowing: bool) -> None:
        event = self._flow()
        if flowing:
            event.set()
        else:
            event.clear()

    def _flow(self) -> asyncio.Event:
        if self._flowing is None:
            self._flowing = asyncio.Event()
            self._flowing.set()
        return self._flowing

    def close(self) -> None:
        self.down()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _call(self, coro: object) -> None:
        future: Future[None] = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        future.result(10)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()  # RST: the peer sees the connection die at once
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        flowing = self._flow()
        self._writers.add(writer)
        await flowing.wait()  # a connection accepted while stalled is held until forwarding resumes
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._writers.discard(writer)
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        await asyncio.gather(
            _pipe(reader, up_writer, flowing), _pipe(up_reader, writer, flowing), return_exceptions=True
        )
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event) -> None:
    """Copy until either side ends; while stalled nothing is read (the data waits in the kernel's buffers,
    as on a network that delivers nothing) and nothing already read is written."""
    with contextlib.suppress(OSError):  # a reset from either side ends this direction
        while True:
            await flowing.wait()
            data = await reader.read(65536)
            if not data:
                break
            await flowing.wait()
            writer.write(data)
            await writer.drain()
    writer.transport.abort()
