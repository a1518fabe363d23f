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
