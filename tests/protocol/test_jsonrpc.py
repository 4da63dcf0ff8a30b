"""JSON-RPC envelope decoding (proxy.protocol.jsonrpc): Raw bodies, error codes, batches."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.protocol.jsonrpc import (
    INVALID_REQUEST,
    PARSE_ERROR,
    Envelope,
    JsonRpcDecodeError,
    decode_message,
    error_body,
)

META = "io.modelcontextprotocol/protocolVersion"


def raw_bytes(raw: msgspec.Raw | None) -> bytes:
    assert raw is not None
    return bytes(raw)


def decode_error(body: bytes) -> JsonRpcDecodeError:
    with pytest.raises(JsonRpcDecodeError) as info:
        decode_message(body)
    return info.value


def test_tools_call_request_lifts_name_and_meta_version() -> None:
    body = (
        b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"get_weather",'
        b'"arguments":{"location":"Seattle"},"_meta":{"' + META.encode() + b'":"2026-07-28",'
        b'"io.modelcontextprotocol/clientCapabilities":{}}}}'
    )
    env = decode_message(body)
    assert env.kind == "request"
    assert env.id == 7
    assert env.method == "tools/call"
    assert env.name == "get_weather"
    assert env.uri is None
    assert env.protocol_version == "2026-07-28"
    assert env.offered_version is None
    assert env.non_string == frozenset()
    assert env.result is None and env.error is None


def test_params_are_kept_byte_identical() -> None:
    params = b'{ "name" : "x",\n  "arguments": {"b": [1, 2.50, "\\u00e9"], "a": null} }'
    body = b'{"jsonrpc":"2.0","id":"abc","method":"tools/call","params":' + params + b"}"
    env = decode_message(body)
    assert raw_bytes(env.params) == params
    assert env.id == "abc"
    assert env.name == "x"


def test_resources_read_lifts_uri() -> None:
    env = decode_message(
        b'{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///a b"}}'
    )
    assert env.uri == "file:///a b"
    assert env.name is None


def test_initialize_lifts_the_offered_version() -> None:
    env = decode_message(
        b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":'
        b'"2025-11-25","capabilities":{},"clientInfo":{"name":"c","version":"1"}}}'
    )
    assert env.offered_version == "2025-11-25"
    assert env.protocol_version is None


def test_notification_has_no_id() -> None:
    env = decode_message(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
    assert env.kind == "notification"
    assert env.id is None
    assert env.params is None


def test_notification_with_params() -> None:
    body = b'{"method":"notifications/cancelled","jsonrpc":"2.0","params":{"requestId":3}}'
    env = decode_message(body)
    assert env.kind == "notification"
    assert raw_bytes(env.params) == b'{"requestId":3}'


def test_response_keeps_result_raw() -> None:
    result = b'{"content":[{"type":"text","text":"hi"}],"isError":false}'
    env = decode_message(b'{"jsonrpc":"2.0","id":5,"result":' + result + b"}")
    assert env.kind == "response"
    assert env.id == 5
    assert raw_bytes(env.result) == result
    assert env.method is None and env.params is None and env.error is None


def test_error_response_keeps_error_raw_and_allows_null_id() -> None:
    error = b'{"code":-32700,"message":"Parse error"}'
    env = decode_message(b'{"jsonrpc":"2.0","id":null,"error":' + error + b"}")
    assert env.kind == "error"
    assert env.id is None
    assert raw_bytes(env.error) == error


def test_null_params_are_passed_on_and_array_params_are_not_lifted() -> None:
    env = decode_message(b'{"jsonrpc":"2.0","id":1,"method":"ping","params":null}')
    assert raw_bytes(env.params) == b"null"
    env = decode_message(b'{"jsonrpc":"2.0","id":1,"method":"sum","params":[1,2]}')
    assert raw_bytes(env.params) == b"[1,2]"
    assert env.name is None


def test_non_string_lifted_fields_are_flagged_not_rejected() -> None:
    # A custom method may use params.name for anything; the MCP rules decide what it means.
    env = decode_message(
        b'{"jsonrpc":"2.0","id":1,"method":"x/y","params":{"name":{"first":"a"},"uri":"u",'
        b'"_meta":{"' + META.encode() + b'":20260728}}}'
    )
    assert env.name is None
    assert env.uri == "u"
    assert env.protocol_version is None
    assert env.non_string == frozenset({"name", META})


def test_meta_that_is_not_an_object_is_flagged() -> None:
    env = decode_message(
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","_meta":"x"}}'
    )
    assert env.name == "t"
    assert env.non_string == frozenset({"_meta"})


def test_unknown_top_level_members_are_ignored() -> None:
    env = decode_message(b'{"jsonrpc":"2.0","id":1,"method":"ping","extra":{"deep":[1]}}')
    assert env.kind == "request"


def test_leading_whitespace_is_fine() -> None:
    assert decode_message(b' \r\n\t{"jsonrpc":"2.0","id":1,"method":"ping"}').method == "ping"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b'{"jsonrpc":"2.0",}',
        b"not json",
        b'{"jsonrpc":"2.0","id":1,"method":"ping"} trailing',
        b'{"jsonrpc":"2.0","id":1,"method":"\xff"}',
        b"[1,",
    ],
)
def test_parse_errors(body: bytes) -> None:
    err = decode_error(body)
    assert err.code == PARSE_ERROR
    assert err.id is None
    assert not err.batch


@pytest.mark.parametrize(
    "body",
    [
        b'{"id":1,"method":"ping"}',  # no jsonrpc
        b'{"jsonrpc":"1.0","id":1,"method":"ping"}',
        b'{"jsonrpc":2.0,"id":1,"method":"ping"}',
        b'{"jsonrpc":"2.0","id":1}',  # neither method nor result/error
        b'{"jsonrpc":"2.0"}',
        b'{"jsonrpc":"2.0","id":1,"method":5}',
        b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}',
        b'{"jsonrpc":"2.0","id":true,"method":"ping"}',
        b'{"jsonrpc":"2.0","id":{},"method":"ping"}',
        b'{"jsonrpc":"2.0","id":null,"method":"ping"}',  # MCP: ids are never null
        b'{"jsonrpc":"2.0","id":1,"method":"ping","params":"x"}',
        b'{"jsonrpc":"2.0","id":1,"method":"ping","params":3}',
        b'{"jsonrpc":"2.0","id":1,"method":"ping","params":true}',
        b'{"jsonrpc":"2.0","id":1,"method":"ping","result":{}}',
        b'{"jsonrpc":"2.0","id":1,"result":{},"error":{"code":1,"message":"m"}}',
        b'{"jsonrpc":"2.0","id":null,"result":{}}',
        b'{"jsonrpc":"2.0","result":{}}',  # a response without id
        b'"just a string"',
        b"42",
        b"null",
    ],
)
def test_invalid_requests(body: bytes) -> None:
    err = decode_error(body)
    assert err.code == INVALID_REQUEST
    assert not err.batch


def test_invalid_request_keeps_the_id_when_it_was_readable() -> None:
    err = decode_error(b'{"jsonrpc":"2.0","id":9,"method":"ping","params":"x"}')
    assert err.id == 9


@pytest.mark.parametrize(
    "body",
    [
        b'[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"n"}]',
        b"[]",
        b'  \n[{"jsonrpc":"2.0","id":1,"method":"ping"}]',
        b"[1, 2, 3]",
    ],
)
def test_batches_are_reported_as_such(body: bytes) -> None:
    err = decode_error(body)
    assert err.batch
    assert err.code == INVALID_REQUEST
    assert "batch" in err.message


def test_duplicate_keys_resolve_last_wins_like_the_backends() -> None:
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call"}'
    assert decode_message(body).method == json.loads(body)["method"] == "tools/call"


def test_error_body_shape() -> None:
    body = error_body(3, -32020, "Header mismatch")
    assert body == b'{"jsonrpc":"2.0","id":3,"error":{"code":-32020,"message":"Header mismatch"}}'
    assert json.loads(error_body(None, -32700, "Parse error")) == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32700, "message": "Parse error"},
    }


def test_error_body_data_is_included_and_raw_is_spliced_verbatim() -> None:
    decoded = json.loads(error_body("a", -32022, "Unsupported", {"supported": ["2026-07-28"]}))
    assert decoded["error"]["data"] == {"supported": ["2026-07-28"]}
    spliced = error_body(1, -1, "m", msgspec.Raw(b'{"x": 1}'))
    assert spliced.endswith(b'"data":{"x": 1}}}')


def test_error_body_escapes_the_message() -> None:
    message = 'quote " and \n newline and \u00e9'
    assert json.loads(error_body(1, -32600, message))["error"]["message"] == message


json_ids = st.one_of(st.integers(min_value=-(2**53), max_value=2**53), st.text(max_size=20))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


@given(
    request_id=json_ids,
    method=st.text(min_size=1, max_size=30),
    params=st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    name=st.none() | st.text(max_size=20),
)
def test_round_trip_against_json(
    request_id: int | str, method: str, params: dict[str, Any], name: str | None
) -> None:
    if name is not None:
        params = {**params, "name": name}
    message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
    body = json.dumps(message, ensure_ascii=False).encode()
    env = decode_message(body)
    assert env == Envelope(
        "request",
        request_id,
        method,
        env.params,
        None,
        None,
        name=params.get("name") if isinstance(params.get("name"), str) else None,
        uri=params.get("uri") if isinstance(params.get("uri"), str) else None,
        protocol_version=None,
        offered_version=params.get("protocolVersion")
        if isinstance(params.get("protocolVersion"), str)
        else None,
        non_string=env.non_string,
    )
    assert json.loads(raw_bytes(env.params)) == params


@pytest.mark.parametrize("where", [b'"params":{"a":"\xff"}', b'"extra":"\xc3\x28"'])
def test_invalid_utf8_anywhere_is_a_parse_error(where: bytes) -> None:
    # msgspec does not look inside members it skips; the proxy must not pass them on.
    err = decode_error(b'{"jsonrpc":"2.0","id":1,"method":"x",' + where + b"}")
    assert err.code == PARSE_ERROR


def test_non_ascii_utf8_is_fine() -> None:
    env = decode_message(
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"天気"}}'.encode()
    )
    assert env.name == "天気"
