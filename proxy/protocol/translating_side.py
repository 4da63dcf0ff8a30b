"""The translating half of the connection machine's request side: MCP requests whose
client speaks another era than the route's backends (``backend_era``), answered here or
rewritten for the backend, with their answers translated back. The rules are sans-IO
modules of their own: ``proxy.protocol.era_translation`` (handshake-era clients on
2026-07-28 backends) and ``proxy.protocol.upstream_sessions`` (2026-07-28 clients on
2025-11-25 backends, within sessions the proxy opens upstream). Sans-IO.
"""

from __future__ import annotations

from typing import Any

import msgspec
from mypy_extensions import mypyc_attr

from proxy.mcp_routing import SESSION_NOT_FOUND, McpDecision, McpRefusal
from proxy.protocol.era_probe import ProbeRequest
from proxy.protocol.era_translation import LocalAnswer, translate
from proxy.protocol.eras import HANDSHAKE_VERSION, MODERN_VERSION
from proxy.protocol.eras import refusal as modern_refusal
from proxy.protocol.exchange import Check
from proxy.protocol.jsonrpc import INTERNAL_ERROR, INVALID_REQUEST
from proxy.protocol.listen_translation import ListenAnswer
from proxy.protocol.mcp import Era
from proxy.protocol.request_side import PROBE_STEP, SESSION_STEP, RequestSide
from proxy.protocol.session_token import TRANSLATED
from proxy.protocol.upstream_sessions import (
    ModernAnswer,
    SessionKey,
    SessionRefused,
    SessionRequest,
    UpstreamSession,
    discover_body,
)
from proxy.routing import Backend

AUTO = "auto"
"""``backend_era`` of a route whose backends' era is probed (``proxy.protocol.era_probe``)."""


@mypyc_attr(allow_interpreted_subclasses=True)
class TranslatingSide(RequestSide):
    __slots__ = ()

    def _translated_here(self, decision: McpDecision) -> bool:
        """Translate the request if its era is not the backends'; True when it has
        been answered (or refused) here."""
        x = self.x
        assert x is not None and x.route is not None
        era = x.route.backend_era
        if era == AUTO:
            known = self.env.route_eras.era(x.route.prefix, self.env.now())
            if known is None:
                return self._probe_era()
            era = decision.backend_era = known
        if decision.era is Era.STATEFUL and era == MODERN_VERSION:
            return self._translate_up(decision)
        if decision.session_state is not None:
            # A translated session's token on a route that no longer translates.
            refusal = McpRefusal(404, INVALID_REQUEST, SESSION_NOT_FOUND, decision.request_id)
            self._refuse(refusal.status, refusal.message, rpc=refusal)
            return True
        if decision.era is Era.STATELESS and era == HANDSHAKE_VERSION:
            return self._translate_down(decision)
        return False

    def _probe_era(self) -> bool:
        """An ``auto`` route whose era this worker does not know (yet, or any more):
        the request waits while a backend of it is probed (``proxy.protocol.era_probe``).
        True (it waits)."""
        x = self.x
        assert x is not None and x.route is not None and self.head is not None
        backend = self.env.choose_backend(x.route, None)
        if backend is None:
            self.env.route_eras.learn(x.route.prefix, None, self.env.now())
            return False  # nothing to probe: the request meets the route's own refusal
        target = x.route.upstream_target(backend, self.head.info.target)
        self._wait(PROBE_STEP, Check(Check.PROBE, ProbeRequest(x.route.prefix, backend, target)))
        return True

    def era_probed(self, result: object) -> None:
        """The era the request waited to learn (``PROBE_STEP``; the worker keeps it)."""
        x = self.x
        assert x is not None and x.mcp is not None
        if not self._translated_here(x.mcp):
            self._mcp_rate_limit()

    def _translate_up(self, decision: McpDecision) -> bool:
        """A handshake-era request on a route whose backends speak only 2026-07-28
        (``proxy.protocol.era_translation``): answered here, or rewritten for the
        backend with its answer translated back. True when answered here."""
        x = self.x
        head = self.head
        assert x is not None and head is not None
        decision.translated_to = MODERN_VERSION
        envelope = decision.envelope
        if head.method == b"DELETE":
            self._answer_here(200, b"", None)  # the session ends with its token
            return True
        if decision.batch:  # 2025-03-26 batches are not translated
            message = "batches are not translated for a 2026-07-28 backend"
            self._refuse(400, message, rpc=McpRefusal(400, INVALID_REQUEST, message, None))
            return True
        if head.method != b"POST" or envelope is None:
            # The translated session has no standalone stream, which a 2025-11-25 server
            # may say with 405.
            message = "Method not allowed: this session has no standalone stream"
            allow = ((b"allow", b"POST, DELETE"),)
            self._refuse(405, message, rpc=McpRefusal(405, INVALID_REQUEST, message, None, allow))
            return True
        if not self.request_done:
            self._refuse(413, "request body too large to translate")
            return True
        tokens = self._tokens()
        outcome = translate(
            envelope,
            b"".join(self.held),
            decision.session_state,
            lambda state: tokens.issue(TRANSLATED, state),
        )
        if isinstance(outcome, LocalAnswer):
            self._answer_here(outcome.status, outcome.body, outcome.reason, outcome.headers)
            return True
        self._rewrite_body(outcome.body)
        answer = outcome.answer
        answer.inner = x.answer_rewrite  # a caller's tool list is filtered first
        answer.request_headers = outcome.headers
        x.answer_rewrite = answer
        decision.issue_session = False
        return False

    def _translate_down(self, decision: McpDecision) -> bool:
        """A 2026-07-28 request on a route whose backends speak only the handshake era
        (``proxy.protocol.upstream_sessions``): it goes within an upstream session,
        which ``_waits_for_session`` finds or has opened once a backend is chosen."""
        x = self.x
        assert x is not None
        envelope = decision.envelope
        assert envelope is not None  # a 2026-07-28 request is one POSTed message
        decision.translated_to = HANDSHAKE_VERSION
        # Closing a 2025-11-25 connection cancels nothing: when the client leaves, the
        # request is left to finish and the backend told (``_cancel_upstream``).
        decision.cancel_on_disconnect = False
        if envelope.kind != "request":
            self._answer_here(202, b"", None)
            return True
        if not self.request_done:
            self._refuse(413, "request body too large to translate")
            return True
        try:
            message = msgspec.json.decode(b"".join(self.held))
        except msgspec.DecodeError:
            message = None
        if not isinstance(message, dict):
            self._refuse(400, "request body is not one JSON-RPC message")
            return True
        refused = modern_refusal(message, envelope.id)
        if refused is not None:
            status, body = refused
            self._answer_here(status, body, "refused as a 2026-07-28 server refuses it")
            return True
        if envelope.method == "subscriptions/listen":
            # Its answer is a stream of the backend's events: closing it ends the GET.
            decision.cancel_on_disconnect = True
            x.answer_rewrite = ListenAnswer(message, envelope.id)
            return False
        x.answer_rewrite = ModernAnswer(message, envelope.id, envelope.method or "")
        return False

    def _waits_for_session(self, backend: Backend) -> bool:
        """With ``backend`` chosen: a request translated for a 2025-11-25 backend goes
        within its session; True when it waits for one to be opened, or was answered
        here (``server/discover``)."""
        x = self.x
        assert x is not None and x.route is not None and self.head is not None
        answer: object = x.answer_rewrite
        if not isinstance(answer, ModernAnswer) or answer.session is not None:
            return False
        key = self._session_key(answer, backend)
        listen = isinstance(answer, ListenAnswer)
        session = None if listen else self.env.upstream_sessions.get(key)
        if session is None:
            target = x.route.upstream_target(backend, self.head.info.target)
            request = SessionRequest(
                backend,
                key,
                target,
                answer.client.initialize_body(),
                dedicated=listen,
                subscribe=answer.subscribe_bodies() if isinstance(answer, ListenAnswer) else (),
            )
            self._wait(SESSION_STEP, Check(Check.SESSION, request))
            return True
        return self._within(answer, key, session)

    def _session_key(self, answer: ModernAnswer, backend: Backend) -> SessionKey:
        """The upstream session ``answer``'s request goes within: the replica's, for
        this caller and the client it declares."""
        x = self.x
        caller = x.identity.subject if x is not None and x.identity is not None else ""
        return answer.client.key(backend.replica, caller)

    def _within(self, answer: ModernAnswer, key: SessionKey, session: UpstreamSession) -> bool:
        """Send the request within ``session`` (or answer ``server/discover`` from it);
        True when answered here."""
        x = self.x
        assert x is not None and x.mcp is not None and x.backend is not None
        if answer.method == "server/discover":
            self._answer_here(200, discover_body(answer.request_id, session), None)
            return True
        assert x.route is not None and self.head is not None
        target = x.route.upstream_target(x.backend, self.head.info.target)
        self._rewrite_body(answer.within(key, session, target))
        x.mcp.replica = x.backend.replica  # the session's replica, if the choice is made again
        return False

    def session_opened(self, result: object) -> None:
        """The upstream session the pending request waited for (``SESSION_STEP``)."""
        x = self.x
        assert x is not None
        answer: object = x.answer_rewrite
        assert isinstance(answer, ModernAnswer)
        if isinstance(result, SessionRefused):
            if x.route is not None and x.route.backend_era == AUTO:
                self.env.route_eras.forget(x.route.prefix)  # what it speaks: probed anew
            refusal = McpRefusal(result.status, INTERNAL_ERROR, result.message, answer.request_id)
            self._refuse(result.status, result.message, rpc=refusal)
            return
        assert isinstance(result, UpstreamSession) and x.backend is not None
        if not self._within(answer, self._session_key(answer, x.backend), result):
            self._choose_backend()

    def _session_lost(self, answer: ModernAnswer) -> bool:
        """The 2025-11-25 backend no longer knows the session a translated request went
        within (404): it is forgotten, and the request goes once more within a new one.
        True when it does."""
        x = self.x
        assert x is not None and x.backend is not None and answer.key is not None
        assert answer.session is not None
        self.env.upstream_sessions.forget(answer.key, answer.session.id)
        if self.retried:
            return False
        self.retried = True
        self.held_answer = None
        self._drop_upstream(ok=True)
        answer.session = None
        if not self._waits_for_session(x.backend):
            self._choose_backend()
        return True

    def _cancel_upstream(self) -> None:
        """A 2026-07-28 client left a request sent within an upstream session before its
        answer: the 2025-11-25 backend is told with ``notifications/cancelled``."""
        x = self.x
        answer: object = x.answer_rewrite if x is not None else None
        if x is None or x.backend is None or not isinstance(answer, ModernAnswer):
            return
        body = answer.cancellation()
        if body is not None:
            self.t.notify_upstream(x.backend, answer.target, answer.request_headers, body)

    def _rewrite_body(self, body: bytes) -> None:
        """The held request body, as the proxy rewrote it, goes to the backend."""
        self.held = [body]
        self.rewritten_length = len(body)

    def _tokens(self) -> Any:
        tokens = self.env.tokens
        if tokens is None:
            raise McpRefusal(500, INTERNAL_ERROR, "MCP session keys are not configured", None)
        return tokens
