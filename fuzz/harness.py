"""The fuzzing invariant, importable without atheris (tests/test_fuzz_corpus.py replays the
corpus through it)."""

from vproxy import mux
from vproxy.mux import frames as fr


def check(data: bytes) -> None:
    """Feed `data` to a fresh client and server Connection, in a few chunks, after a
    stream was opened and accepted so that stream frames reach real state."""
    for client in (False, True):
        conn = mux.Connection(client=client, config=mux.Config(max_streams=8, initial_window=4096))
        if client:
            conn.open_stream({"vm": "v", "channel": "c", "mode": "rw"})
        cut = len(data) // 3
        for chunk in (data[:cut], data[cut:]):
            for event in conn.receive_data(chunk, 0.0):
                assert isinstance(event, mux.Event)
                if (isinstance(event, mux.StreamOpened)
                        and conn.stream_state(event.stream_id) == mux.StreamState.PENDING):
                    conn.accept(event.stream_id, {"k": "v"})
                    conn.send_data(event.stream_id, b"hello", end_stream=bool(len(data) % 2))
            out = conn.data_to_send()
            decoder = fr.FrameDecoder()
            decoder.feed(out)
            while decoder.next_frame() is not None:  # what we send must decode
                pass
        conn.handle_timer(100.0)
        conn.data_to_send()
