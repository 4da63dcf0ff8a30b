"""What a client or a backend makes of the bytes the connection machine wrote, read with
h11, the reference parser. Tests compare these readings rather than exact bytes, which
legitimately differ when the input came in pieces (a chunked body is re-chunked as it
arrives, a head that did not come whole is rebuilt)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import h11


@dataclass
class Answer:
    """A response as a client reads it."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    complete: bool = False
    """The body ended as its framing says (a cut connection leaves it False)."""
    informational: list[int] = field(default_factory=list)
    """1xx statuses before it."""

    def header(self, name: bytes) -> bytes | None:
        values = [value for key, value in self.headers if key == name]
        return b", ".join(values) if values else None


def client_answers(
    data: bytes, methods: Sequence[bytes] = (b"GET",), *, eof: bool = False
) -> list[Answer]:
    """The responses in ``data`` (what the machine wrote to the client), read by an h11
    client that sent requests of ``methods`` in turn; ``eof``: the connection ended
    after ``data``. Reading stops at the first response that is not complete; bytes
    after the last expected response fail the test."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    out: list[Answer] = []
    for method in methods:
        if out:
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                break
            conn.start_next_cycle()
        conn.send(h11.Request(method=method, target="/", headers=[(b"host", b"example")]))
        conn.send(h11.EndOfMessage())
        answer: Answer | None = None
        informational: list[int] = []
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                break  # cut short: the answer stays incomplete
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.InformationalResponse):
                informational.append(event.status_code)
            elif isinstance(event, h11.Response):
                answer = Answer(event.status_code, list(event.headers), b"", False, informational)
            elif isinstance(event, h11.Data):
                assert answer is not None
                answer.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert answer is not None
                answer.complete = True
                break
            else:
                break
        if answer is None:
            break
        out.append(answer)
        if not answer.complete:
            break
    if len(out) == len(methods) and out[-1].complete:
        left = conn.trailing_data[0]
        assert not left, f"bytes after the last answer: {left!r}"
    return out


def client_answer(data: bytes, method: bytes = b"GET", *, eof: bool = False) -> Answer:
    """The one response in ``data``."""
    answers = client_answers(data, (method,), eof=eof)
    assert len(answers) == 1, f"no response in {data!r}"
    return answers[0]


@dataclass
class Sent:
    """A request as a backend reads it."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    complete: bool = False

    def header(self, name: bytes) -> bytes | None:
        values = [value for key, value in self.headers if key == name]
        return b", ".join(values) if values else None


def backend_requests(data: bytes | bytearray) -> list[Sent]:
    """The requests in ``data`` (what the machine wrote to a backend), read by h11."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(bytes(data))
    out: list[Sent] = []
    while True:
        if out and out[-1].complete:
            if conn.their_state is not h11.DONE:
                break
            # The backend's half of the cycle: a response, so h11 reads the next request.
            conn.send(h11.Response(status_code=204, headers=[]))
            conn.send(h11.EndOfMessage())
            conn.start_next_cycle()
        event = conn.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED:
            break
        if isinstance(event, h11.Request):
            out.append(Sent(event.method, event.target, list(event.headers)))
        elif isinstance(event, h11.Data):
            out[-1].body += event.data
        elif isinstance(event, h11.EndOfMessage):
            out[-1].complete = True
        else:
            break
    return out


def backend_request(data: bytes | bytearray) -> Sent:
    """The one request in ``data``."""
    requests = backend_requests(data)
    assert len(requests) == 1, f"not one request in {bytes(data)!r}"
    return requests[0]
