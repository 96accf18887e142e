"""Two sans-IO Connections wired back to back in memory, with a controllable clock."""

from typing import Dict, List, Tuple

from vproxy import mux


class Pair:
    def __init__(self, config: mux.Config = None):
        self.now = 0.0
        self.client = mux.Connection(client=True, config=config, now=self.now)
        self.server = mux.Connection(client=False, config=config, now=self.now)
        self.events: Dict[str, List[mux.Event]] = {"client": [], "server": []}
        # bytes each side received per stream and has not yet acknowledged
        self.unread: Dict[Tuple[str, int], int] = {}

    def side(self, name: str) -> mux.Connection:
        return self.client if name == "client" else self.server

    def pump(self, limit: int = 1 << 30, rounds: int = 10000) -> None:
        """Move bytes both ways until neither side has anything to send."""
        for _ in range(rounds):
            moved = False
            for src, dst, name in ((self.client, self.server, "server"), (self.server, self.client, "client")):
                data = src.data_to_send(limit)
                if data:
                    moved = True
                    self._deliver(name, dst.receive_data(data, self.now))
            if not moved:
                return
        raise AssertionError("pump did not settle")

    def _deliver(self, name: str, events: List[mux.Event]) -> None:
        for event in events:
            self.events[name].append(event)
            if isinstance(event, mux.DataReceived):
                key = (name, event.stream_id)
                self.unread[key] = self.unread.get(key, 0) + len(event.data)

    def read_all(self, name: str, stream_id: int) -> int:
        """The application of side `name` consumes everything it received on a stream."""
        size = self.unread.pop((name, stream_id), 0)
        if size:
            self.side(name).acknowledge(stream_id, size, self.now)
        return size

    def take(self, name: str, kind) -> List[mux.Event]:
        found = [e for e in self.events[name] if isinstance(e, kind)]
        self.events[name] = [e for e in self.events[name] if not isinstance(e, kind)]
        return found

    def received(self, name: str, stream_id: int) -> bytes:
        return b"".join(e.data for e in self.events[name]
                        if isinstance(e, mux.DataReceived) and e.stream_id == stream_id)

    def open(self, fields=None, priority=mux.Priority.BULK) -> int:
        sid = self.client.open_stream(fields or {"vm": "", "channel": "echo", "mode": "rw"}, priority)
        self.pump()
        self.server.accept(sid, {})
        self.pump()
        return sid
