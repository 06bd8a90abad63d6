"""`cocatk serve`: the web page and JSON API over an index (FastAPI on uvicorn)."""

from __future__ import annotations

from typing import Annotated

import typer

from . import options
from .render import note, warn

#: Hosts that only this machine can reach: no token needed there.
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    index: options.IndexDir = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to bind; anything but 127.0.0.1 needs --token or --no-auth.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8765,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="COCATK_TOKEN",
            help="Require this token on every API request (Authorization: Bearer, ?token=, or cocatk_token cookie).",
        ),
    ] = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Serve a non-local --host without a token (anyone who can reach it).")
    ] = False,
    cors: Annotated[
        str | None, typer.Option("--cors", help="Allow cross-origin requests from exactly this origin.")
    ] = None,
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", min=0.01, help="Largest query image accepted (MB).")
    ] = 20.0,
    model: options.Model = None,
    pretrained: options.Pretrained = None,
    device: options.Device = None,
) -> None:
    """Serve a search page and a JSON API (OpenAPI at /docs) over the index; the model loads once, at start."""
    from ..errors import EmptyIndexError, UsageError

    if token is not None and not token.strip():
        raise UsageError("--token is empty", hint="pass a long random token, e.g. `--token $(openssl rand -hex 16)`")
    if token is not None and no_auth:
        raise UsageError("--token and --no-auth exclude each other", hint="pick one")
    if host not in LOCAL_HOSTS and token is None and not no_auth:
        raise UsageError(
            f"--host {host} makes the index reachable from other machines without a token",
            hint="add --token TOKEN (e.g. `--token $(openssl rand -hex 16)`), or --no-auth to serve it to anyone",
        )
    if host not in LOCAL_HOSTS and no_auth:
        warn(f"serving {host}:{port} without authentication: anyone who can reach it can search and view the images")
    from ..retrieval.index import Index

    # Fail fast, before the model loads: a missing index raises IndexNotFoundError; an empty one is refused here.
    with Index.open(index) as ix:
        if ix.is_empty:
            raise EmptyIndexError(
                f"the index at {ix.dir} holds no images", hint=f"run `cocatk index PATH --index {ix.dir}`"
            )

    import uvicorn

    from ..server.app import ServeSettings, create_app

    settings = ServeSettings(index, model, pretrained, device, token, cors, max_upload_mb)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    # uvicorn's access log is off: a `?token=` in a logged URL would leak the token into logs.
    note(f"cocatk serve: loading the model, then listening on {url} (API docs at {url}docs)")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", access_log=False)
