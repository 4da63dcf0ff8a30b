"""The msgspec structs and decoders of ``proxy.protocol.jsonrpc``, in a module of their
own: mypyc would compile a Struct's class body as a class of its own, so the functions
that use them (``jsonrpc``) are compiled and these are not (``proxy.native``)."""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec
from msgspec import UNSET, Raw, Struct, UnsetType, field

RequestId = int | str
Kind = Literal["request", "notification", "response", "error"]
PROTOCOL_VERSION_META_KEY: Final = "io.modelcontextprotocol/protocolVersion"


class Envelope(Struct, frozen=True, gc=False):
    """One decoded JSON-RPC message. Raw fields hold the exact bytes from the body.

    A frozen msgspec Struct rather than a frozen dataclass: it is built once per message
    and a frozen dataclass's __init__ alone cost 1.6 µs here, the Struct 0.1 µs.
    """

    kind: Kind
    id: RequestId | None
    """None for notifications and for error responses to unidentifiable requests."""
    method: str | None
    params: Raw | None
    result: Raw | None
    error: Raw | None
    name: str | None = None
    """params.name (tools/call, prompts/get) when it is a string."""
    uri: str | None = None
    """params.uri (resources/read, resources/subscribe) when it is a string."""
    protocol_version: str | None = None
    """params._meta["io.modelcontextprotocol/protocolVersion"] (2026-07-28 envelope)."""
    offered_version: str | None = None
    """params.protocolVersion: the version an `initialize` request offers."""
    non_string: frozenset[str] = frozenset()
    """Lifted fields present with a non-string value: "name", "uri", "protocolVersion",
    the meta key; "_meta" when _meta itself is not an object."""
    traceparent: str | None = None
    """params._meta.traceparent (W3C trace context in the message, SEP-414)."""


class Meta(Struct):
    version: str | None = field(default=None, name=PROTOCOL_VERSION_META_KEY)
    traceparent: str | None = None


class NamedParams(Struct):
    # Unknown fields are skipped by the decoder without being materialised.
    name: str | None = None
    uri: str | None = None
    offered: str | None = field(default=None, name="protocolVersion")
    meta: Meta | None = field(default=None, name="_meta")


ABSENT = Raw(b"")  # a present member's Raw is never empty, so len() tells absence


class Wire(Struct):
    jsonrpc: str | UnsetType = UNSET
    id: int | str | UnsetType | None = UNSET  # UNSET: a notification; None: "id": null
    method: str | UnsetType = UNSET
    params: Raw = ABSENT
    result: Raw = ABSENT
    error: Raw = ABSENT


class ResponseProbe(Struct):
    """Only what tells a response and its id: other members are not validated."""

    id: int | str | None = None
    result: Raw = ABSENT
    error: Raw = ABSENT


class ErrorObject(Struct):
    code: int
    message: str
    data: Any = UNSET  # UNSET fields are left out of the encoding


class ErrorResponse(Struct):
    jsonrpc: str
    id: RequestId | None
    error: ErrorObject


wire_decoder = msgspec.json.Decoder(Wire)
probe_decoder = msgspec.json.Decoder(ResponseProbe)
params_decoder = msgspec.json.Decoder(NamedParams)
array_decoder = msgspec.json.Decoder(list[Raw])
any_decoder = msgspec.json.Decoder()
encoder = msgspec.json.Encoder()
