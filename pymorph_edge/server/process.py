"""Running the app in this process: uvicorn, with a shutdown that does not wait on a generation."""

from __future__ import annotations

from typing import Any

import uvicorn

from pymorph_edge.server.app import ServedApp

SHUTDOWN_GRACE_S = 5  # after SIGTERM / Ctrl-C, open connections get this long before they are closed


class StoppingServer(uvicorn.Server):
    """uvicorn waits for open requests before it exits, and a generation can run for minutes; so the
    first SIGTERM / Ctrl-C also stops every running and queued generation at its next token."""

    def __init__(self, config: uvicorn.Config, app: ServedApp) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._app.stop_generations()
        super().handle_exit(sig, frame)


def serve(app: ServedApp, host: str, port: int, log_level: str = "warning") -> None:
    """Serve until SIGTERM / Ctrl-C; returns once the server has shut down."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    StoppingServer(config, app).run()
