"""The parts of uvicorn.Server that flasma_ws/server.py relies on beyond its documented API.

FlasmaServer overrides `handle_exit` (so that a drain exits 0 instead of re-raising the signal)
and reads `servers` to close the listener and log the bound port; an upgrade that renames or
reshapes them must fail here, not in production.
"""

from __future__ import annotations

import inspect

import uvicorn

from flasma_ws.server import FlasmaServer


def test_signals_are_routed_through_handle_exit() -> None:
    params = list(inspect.signature(uvicorn.Server.handle_exit).parameters)
    assert params == ["self", "sig", "frame"]
    source = inspect.getsource(uvicorn.Server.capture_signals)
    # Our override is installed as the handler, and by not recording the signal in
    # _captured_signals it keeps uvicorn from re-raising it after shutdown.
    assert "self.handle_exit" in source and "_captured_signals" in source


def test_startup_fills_servers_and_the_flags_exist() -> None:
    assert "self.servers" in inspect.getsource(uvicorn.Server.startup)
    assert "self.servers" in inspect.getsource(uvicorn.Server.shutdown)
    bare = uvicorn.Server(uvicorn.Config(app=lambda *_: None))
    assert {"should_exit", "force_exit", "started"} <= vars(bare).keys()
    for name in ("serve", "startup", "run"):
        assert inspect.signature(getattr(uvicorn.Server, name)).parameters.get("sockets")


def test_our_attributes_do_not_shadow_uvicorns() -> None:
    ours = {"service", "app", "settings", "fatal", "event_loop", "_draining"}
    bare = uvicorn.Server(uvicorn.Config(app=lambda *_: None))
    assert not ours & (vars(bare).keys() | set(dir(uvicorn.Server)))
    assert set(dir(FlasmaServer)) >= {"handle_exit", "begin_drain"}


def test_the_protocol_hooks_that_admission_overrides_exist():
    """flasma_ws/admission.py subclasses uvicorn's httptools and websockets-sansio protocols:
    it counts a connection in connection_made, gives the slot back in connection_lost (the
    WebSocket protocol's, once handle_websocket_upgrade has moved the transport to it), and
    times the request head from on_message_begin to on_headers_complete."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    hooks = {
        "connection_made": ["self", "transport"],
        "connection_lost": ["self", "exc"],
        "data_received": ["self", "data"],
        "on_message_begin": ["self"],
        "on_headers_complete": ["self"],
        "on_body": ["self", "body"],
        "on_message_complete": ["self"],
        "handle_websocket_upgrade": ["self"],
        "_should_upgrade": ["self"],
    }
    for name, params in hooks.items():
        assert list(inspect.signature(getattr(HttpToolsProtocol, name)).parameters) == params
    upgrade = inspect.getsource(HttpToolsProtocol.handle_websocket_upgrade)
    assert "self.ws_protocol_class(" in upgrade and "self.transport.set_protocol(" in upgrade
    assert "self.url" in inspect.getsource(HttpToolsProtocol.on_url)
    for attribute in ("self.client", "self.transport", "self.loop", "self.parser"):
        assert attribute in inspect.getsource(HttpToolsProtocol.__init__)
    assert "self.transport" in inspect.getsource(WebSocketsSansIOProtocol.connection_made)
    assert "def connection_lost" in inspect.getsource(WebSocketsSansIOProtocol)
    # The deadlines and the bounded pipeline (admission.GuardedHttpProtocol, PipelineFlow).
    init = inspect.getsource(HttpToolsProtocol.__init__)
    assert "self.pipeline" in init and "self.cycle" in init
    assert "self.flow = FlowControl(" in inspect.getsource(HttpToolsProtocol.connection_made)
    assert "self.flow.resume_reading()" in inspect.getsource(HttpToolsProtocol.on_response_complete)
    cycle = inspect.getsource(RequestResponseCycle.__init__)
    for attribute in ("disconnected", "keep_alive", "response_started", "message_event"):
        assert f"self.{attribute} =" in cycle
    assert "self.flow.resume_reading()" in inspect.getsource(RequestResponseCycle.receive)
    # The pings: uvicorn's keepalive closes through keepalive_timeout (counted by stage).
    ws_init = inspect.getsource(WebSocketsSansIOProtocol.__init__)
    assert "self.ping_timeout = config.ws_ping_timeout" in ws_init
    assert "self.keepalive_timeout" in inspect.getsource(WebSocketsSansIOProtocol)


def test_config_takes_protocol_classes_for_http_and_ws():
    from flasma_ws.admission import Guard, Limits, guarded_protocols
    from flasma_ws.metrics import Metrics

    http, ws = guarded_protocols(Guard(Limits(8, 8, 1.0), Metrics()))
    config = uvicorn.Config(app=lambda *_: None, http=http, ws=ws)
    config.load()
    assert (config.http_protocol_class, config.ws_protocol_class) == (http, ws)
