"""The session state machine: scenarios, protocol violations, and a stateful model."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vproxy import mux
from vproxy.mux import frames as fr
from support.muxpair import Pair
from test_mux_frames import any_frame


def test_open_accept_data_and_half_close_both_ways():
    p = Pair()
    sid = p.client.open_stream({"vm": "web1", "channel": "console", "mode": "rw", "replay": "100"},
                               mux.Priority.INTERACTIVE)
    p.pump()
    (opened,) = p.take("server", mux.StreamOpened)
    assert opened.fields == {"vm": "web1", "channel": "console", "mode": "rw", "replay": "100"}
    assert opened.priority == mux.Priority.INTERACTIVE
    p.server.accept(sid, {"offset": "42"})
    p.pump()
    (accepted,) = p.take("client", mux.StreamAccepted)
    assert accepted.info == {"offset": "42"}
    p.client.send_data(sid, b"hello", end_stream=True)
    p.pump()
    assert p.received("server", sid) == b"hello"
    assert p.take("server", mux.StreamEnded)
    # the other direction still works after the client half-closed
    p.server.send_data(sid, b"world")
    p.server.end_stream(sid)
    p.pump()
    assert p.received("client", sid) == b"world"
    assert p.take("client", mux.StreamClosed)
    assert p.client.open_streams == 0 and p.server.open_streams == 0


def test_refusal_carries_code_and_message_and_the_session_lives_on():
    p = Pair()
    sid = p.client.open_stream({"vm": "nope", "channel": "console", "mode": "rw"})
    p.pump()
    p.server.refuse(sid, mux.RefuseCode.NO_SUCH_VM, "no VM named 'nope'")
    p.pump()
    (refused,) = p.take("client", mux.StreamRefused)
    assert (refused.code, refused.message) == (mux.RefuseCode.NO_SUCH_VM, "no VM named 'nope'")
    assert p.open() > sid  # the session still opens streams


def test_sender_never_exceeds_the_window_and_resumes_on_credit():
    p = Pair(mux.Config(initial_window=64 * 1024))
    sid = p.open()
    p.client.send_data(sid, b"x" * 1_000_000)
    p.pump()
    assert len(p.received("server", sid)) == 64 * 1024  # stalled at the window
    total = 64 * 1024
    while total < 1_000_000:
        p.read_all("server", sid)
        p.pump()
        now = len(p.received("server", sid))
        assert now > total
        total = now
    assert total == 1_000_000


def test_window_grows_toward_the_bandwidth_delay_product_and_stays_capped():
    config = mux.Config(initial_window=64 * 1024, max_window=1024 * 1024)
    p = Pair(config)
    sid = p.open()
    p.client.send_data(sid, b"x" * 20_000_000)
    for _ in range(2000):
        p.now += 0.0001  # the reader keeps up: credit comes back well within an RTT
        p.pump(limit=64 * 1024)
        p.read_all("server", sid)
    assert p.server.recv_window(sid) == config.max_window


def test_window_does_not_grow_for_a_slow_reader():
    p = Pair(mux.Config(initial_window=64 * 1024))
    sid = p.open()
    p.client.send_data(sid, b"x" * 5_000_000)
    for _ in range(50):
        p.now += 1.0  # a reader far slower than the RTT
        p.pump()
        p.read_all("server", sid)
    assert p.server.recv_window(sid) == 64 * 1024


def test_window_follows_the_path_round_trip_not_a_queue_inflated_ping():
    """A session that starts with a bulk transfer pings through a full queue: its
    base round trip must come from below the mux (TCP's), or every window grows to
    hold that queue, and a keystroke on another stream waits behind it."""
    def grown_window(path_rtt):
        p = Pair(mux.Config(initial_window=64 * 1024, max_window=16 * 1024 * 1024))
        p.open(priority=mux.Priority.INTERACTIVE)  # a console beside the transfer
        sid = p.open()
        p.server.probe_rtt(p.now)
        p.client.receive_data(p.server.data_to_send(), p.now)
        p.now += 0.05  # the answer waited behind 50 ms of queued data
        p.pump()
        assert p.server.min_rtt == pytest.approx(0.05)
        if path_rtt is not None:
            p.server.observe_path_rtt(path_rtt)
            p.server.observe_path_rtt(1.0)  # only ever lowers it
            assert p.server.min_rtt == path_rtt
        p.client.send_data(sid, b"x" * 50_000_000)
        reader_at(p, sid, 2000)  # one second of a reader taking 128 MB/s
        return p.server.recv_window(sid)

    inflated, base = grown_window(None), grown_window(0.0001)
    assert base <= 128 * 1024  # 2 x the 0.25 ms floor x 128 MB/s = 64 KB: about the initial window
    assert inflated >= 8 * base, (inflated, base)


def reader_at(p, sid, steps, per_step=64 * 1000, dt=0.0005):
    """The server's reader takes per_step bytes every dt (128 MB/s by default)."""
    for _ in range(steps):
        p.now += dt
        p.pump(limit=64 * 1024)
        unread = p.unread.get(("server", sid), 0)
        taken = min(unread, per_step)
        p.unread[("server", sid)] = unread - taken
        p.server.acknowledge(sid, taken, p.now)


def test_bulk_windows_grow_further_until_an_interactive_stream_opens():
    """Bulk streams alone: windows for 2 x 2 ms of the reader's rate (throughput).
    Once a console opens beside them: back toward 2 x 0.25 ms (what a keystroke waits
    behind)."""
    p = Pair(mux.Config(initial_window=64 * 1024, max_window=16 * 1024 * 1024))
    sid = p.open()
    p.server.observe_path_rtt(0.0001)
    p.client.send_data(sid, b"x" * 200_000_000)
    reader_at(p, sid, 1000)
    bulk_only = p.server.recv_window(sid)
    assert 512 * 1024 <= bulk_only <= 1024 * 1024, bulk_only  # 2 x 2 ms x 128 MB/s = 512 KB
    p.open(priority=mux.Priority.INTERACTIVE)
    reader_at(p, sid, 1000)
    beside_console = p.server.recv_window(sid)
    assert beside_console <= 256 * 1024 and beside_console * 2 <= bulk_only, (bulk_only, beside_console)


def test_session_budget_caps_the_sum_of_windows():
    config = mux.Config(initial_window=256 * 1024, session_window_limit=1024 * 1024, min_window=4096)
    p = Pair(config)
    sids = [p.open() for _ in range(10)]
    windows = [p.server.recv_window(s) for s in sids]
    assert windows[:4] == [256 * 1024] * 4
    assert all(w == 4096 for w in windows[4:])
    assert p.server.budget_used <= config.session_window_limit + len(sids) * config.min_window


def test_interactive_frames_go_before_bulk():
    p = Pair()
    bulk = p.open(priority=mux.Priority.BULK)
    console = p.open(priority=mux.Priority.INTERACTIVE)
    p.client.send_data(bulk, b"B" * 200_000)
    p.client.send_data(console, b"k")
    first = p.client.data_to_send(limit=fr.MAX_PAYLOAD)
    decoder = fr.FrameDecoder()
    decoder.feed(first)
    frame = decoder.next_frame()
    assert (frame.stream_id, frame.data) == (console, b"k")


def test_ping_measures_rtt():
    p = Pair()
    p.client.ping(now=1.0)
    p.server.receive_data(p.client.data_to_send(), 1.0)
    events = p.client.receive_data(p.server.data_to_send(), 1.25)
    assert [e.rtt for e in events if isinstance(e, mux.PingAcknowledged)] == [0.25]
    assert p.client.rtt == 0.25


def test_keepalive_pings_when_idle_and_declares_a_silent_peer_dead():
    config = mux.Config(keepalive_interval=2.0, keepalive_timeout=5.0)
    c = mux.Connection(client=True, config=config, now=0.0)
    assert c.handle_timer(1.0) == [] and c.data_to_send() == b""
    assert c.handle_timer(2.0) == []
    out = c.data_to_send()
    assert out[3] == fr.FrameType.PING
    assert c.next_deadline() == 5.0
    (dead,) = c.handle_timer(5.0)
    assert isinstance(dead, mux.ConnectionTerminated) and dead.code == mux.ErrorCode.KEEPALIVE_TIMEOUT
    assert c.data_to_send()[3] == fr.FrameType.GOAWAY


def test_goaway_drains_open_streams_and_refuses_new_ones():
    p = Pair()
    live = p.open()
    p.server.goaway(mux.ErrorCode.NO_ERROR, "maintenance")
    late = p.client.open_stream({"vm": "", "channel": "echo", "mode": "rw"})  # crosses the GOAWAY
    p.pump()
    (goaway,) = p.take("client", mux.GoAwayReceived)
    assert goaway.message == "maintenance" and goaway.last_stream_id == live
    assert [e.stream_id for e in p.take("client", mux.StreamRefused)] == [late]
    with pytest.raises(mux.LocalProtocolError):
        p.client.open_stream({"vm": "", "channel": "echo", "mode": "rw"})
    p.client.send_data(live, b"still flowing", end_stream=True)
    p.server.end_stream(live)
    p.pump()
    assert p.received("server", live) == b"still flowing"
    assert p.server.is_drained and p.client.is_drained


def test_stream_limit_refuses_with_a_reason_and_session_lives():
    p = Pair(mux.Config(max_streams=2))
    p.open(), p.open()
    sid = p.client.open_stream({"vm": "", "channel": "echo", "mode": "rw"})
    p.pump()
    (refused,) = p.take("client", mux.StreamRefused)
    assert refused.stream_id == sid and refused.code == mux.RefuseCode.TOO_MANY_STREAMS
    assert not p.server.terminated


@pytest.mark.parametrize("wire, code, needle", [
    (fr.encode_data(7, b"x"), mux.ErrorCode.PROTOCOL_ERROR, "never opened"),
    (fr.encode_open(2, 1000, 0, {"vm": "a"}), mux.ErrorCode.PROTOCOL_ERROR, "parity"),
    (fr.header(fr.MAX_PAYLOAD + 1, 0, 0, 1), mux.ErrorCode.FRAME_SIZE_ERROR, "exceeds"),
    (fr.header(1, 0x3F, 0, 1) + b"x", mux.ErrorCode.PROTOCOL_ERROR, "unknown frame type"),
])
def test_protocol_violations_end_the_session_with_a_goaway_naming_them(wire, code, needle):
    server = mux.Connection(client=False)
    (event,) = server.receive_data(wire, 0.0)
    assert isinstance(event, mux.ConnectionTerminated)
    assert event.code == code and needle in event.message
    decoder = fr.FrameDecoder()
    decoder.feed(server.data_to_send())
    goaway = decoder.next_frame()
    assert goaway.type == fr.FrameType.GOAWAY and goaway.code == code and needle in goaway.message
    assert server.receive_data(fr.encode_ping(b"\0" * 8), 0.0) == []  # nothing after the end


def test_window_overrun_is_a_flow_control_error():
    p = Pair(mux.Config(initial_window=16384))
    sid = p.open()
    overrun = fr.encode_data(sid, b"x" * 16384) + fr.encode_data(sid, b"y")
    events = p.server.receive_data(overrun, 0.0)
    assert isinstance(events[-1], mux.ConnectionTerminated)
    assert events[-1].code == mux.ErrorCode.FLOW_CONTROL_ERROR


def test_data_after_end_resets_only_that_stream():
    p = Pair()
    bad, good = p.open(), p.open()
    p.client.end_stream(bad)
    p.pump()
    events = p.server.receive_data(fr.encode_data(bad, b"late"), 0.0)
    assert [type(e) for e in events] == [mux.StreamReset, mux.StreamClosed]
    assert events[0].code == mux.ResetCode.STREAM_CLOSED and not events[0].remote
    p.client.send_data(good, b"fine")
    p.pump()
    assert p.received("server", good) == b"fine"
    assert not p.server.terminated


@settings(max_examples=500)
@given(st.booleans(), st.lists(st.one_of(st.binary(max_size=64), any_frame.map(fr.encode)), max_size=8))
def test_arbitrary_input_gives_events_never_exceptions(client, chunks):
    conn = mux.Connection(client=client)
    for chunk in chunks:
        events = conn.receive_data(chunk, 0.0)
        assert all(isinstance(e, mux.Event) for e in events)
        conn.data_to_send()


class SessionModel(RuleBasedStateMachine):
    """Random use of both sides, checked against a model of what must have arrived."""

    def __init__(self):
        super().__init__()
        self.p = Pair(mux.Config(initial_window=8192, max_window=65536, min_window=1024,
                                 session_window_limit=65536, max_streams=8))
        self.sent = {}  # (to side, stream) -> bytes sent toward that side
        self.pending = []  # streams the server has not answered
        self.live = set()  # accepted streams
        self.ended = set()  # (side, stream) that side ended

    @rule(priority=st.sampled_from(list(mux.Priority)))
    def open(self, priority):
        if len(self.pending) + len(self.live) < 8:
            sid = self.p.client.open_stream({"vm": "v", "channel": "c", "mode": "rw"}, priority)
            self.p.pump()
            self.pending.append(sid)

    @precondition(lambda self: self.pending)
    @rule(accept=st.booleans())
    def answer(self, accept):
        sid = self.pending.pop(0)
        if accept:
            self.p.server.accept(sid)
            self.live.add(sid)
        else:
            self.p.server.refuse(sid, mux.RefuseCode.BUSY, "busy")
        self.p.pump()  # the client uses a stream once it saw the answer

    @precondition(lambda self: self.live)
    @rule(data=st.data(), side=st.sampled_from(["client", "server"]), size=st.integers(0, 40000))
    def send(self, data, side, size):
        sid = data.draw(st.sampled_from(sorted(self.live)))
        if (side, sid) in self.ended:
            with pytest.raises(mux.LocalProtocolError):
                self.p.side(side).send_data(sid, b"x")
            return
        payload = bytes([sid % 251]) * size
        self.p.side(side).send_data(sid, payload)
        other = "server" if side == "client" else "client"
        self.sent[(other, sid)] = self.sent.get((other, sid), b"") + payload

    @precondition(lambda self: self.live)
    @rule(data=st.data(), side=st.sampled_from(["client", "server"]))
    def end(self, data, side):
        sid = data.draw(st.sampled_from(sorted(self.live)))
        if (side, sid) not in self.ended:
            self.p.side(side).end_stream(sid)
            self.ended.add((side, sid))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), side=st.sampled_from(["client", "server"]))
    def reset(self, data, side):
        sid = data.draw(st.sampled_from(sorted(self.live)))
        self.p.side(side).reset_stream(sid, mux.ResetCode.CANCEL, "bye")
        self.live.discard(sid)
        for key in list(self.sent):
            if key[1] == sid:
                del self.sent[key]

    @rule(side=st.sampled_from(["client", "server"]))
    def read(self, side):
        for sid in sorted(self.live):
            self.p.read_all(side, sid)

    @rule(limit=st.sampled_from([100, 20000, 1 << 20]))
    def pump(self, limit):
        self.p.now += 0.001
        self.p.pump(limit)

    @invariant()
    def nothing_terminated_and_prefix_delivered(self):
        assert not self.p.client.terminated and not self.p.server.terminated
        for (side, sid), payload in self.sent.items():
            got = self.p.received(side, sid)
            assert payload.startswith(got)

    @invariant()
    def budgets_hold(self):
        for conn in (self.p.client, self.p.server):
            c = conn.config
            assert conn.budget_used <= c.session_window_limit + conn.open_streams * c.min_window

    def teardown(self):
        # with readers reading, everything sent on live streams arrives
        for _ in range(200):
            self.p.now += 0.001
            self.p.pump()
            for side in ("client", "server"):
                for sid in sorted(self.live):
                    self.p.read_all(side, sid)
        for (side, sid), payload in self.sent.items():
            if sid in self.live:
                assert self.p.received(side, sid) == payload


TestSessionModel = SessionModel.TestCase
TestSessionModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_a_peer_that_sends_pings_and_never_reads_the_answers_is_cut_off():
    server = mux.Connection(client=False, config=mux.Config(max_control_backlog=1000))
    pings = fr.encode_ping(b"\0" * 8) * 600
    assert server.receive_data(pings, 0.0) == []  # 600 answers queued: fine
    (event,) = server.receive_data(pings, 0.0)  # 1200: more than it may owe
    assert isinstance(event, mux.ConnectionTerminated) and event.code == mux.ErrorCode.OVERLOADED
    assert "does not read" in event.message
