"""A TCP proxy in front of a node, for the network faults a test cannot get from a healthy loopback:
the node's advertised address accepts connections and never answers (`hang`), or drops every connection
at once (`refuse`), while the node itself keeps heartbeating to its router directly. The mode applies to
new connections and to bytes on connections already open (a router's kept-alive ones)."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from tests.processes import free_port

MODES = ("pass", "hang", "refuse")


class Proxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.mode = "pass"
        self.connections = 0  # accepted since start, whatever the mode
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"proxy-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Proxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def set(self, mode: str) -> None:
        assert mode in MODES
        self.mode = mode

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._loop.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.mode == "refuse":
            writer.close()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pump(reader, upstream_writer), self._pump(upstream_reader, writer),
                             return_exceptions=True)
        for end in (writer, upstream_writer):
            end.close()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            if self.mode == "hang":
                await asyncio.Event().wait()  # hold the connection open, say nothing, ever
            if self.mode == "refuse":
                break
            sink.write(data)
            with contextlib.suppress(ConnectionError):
                await sink.drain()
        with contextlib.suppress(OSError):
            sink.close()
