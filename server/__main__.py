"""`python -m server [standalone|node|router] [flags]`: parse flags and SDSERVE_* variables into Settings,
log them (secrets masked), and serve."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from collections.abc import Callable
from types import FrameType

import msgspec
import uvicorn

from server import logs
from server.app import asgi, create_app, on_terminate
from server.node.models_dir import discover
from server.router.admission import allowed_networks
from server.settings import InvalidSettings, Settings, add_arguments, from_sources

ROLES = ("standalone", "node", "router")
ANSWER_SECONDS = 2  # after the drain timeout, to send the answers of the renders it gave up


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(
        prog="python -m server",
        description="sdserve: the OpenAI Images API (generations, edits, variations) on Stable Diffusion. "
        "Every setting can also be given as the SDSERVE_ environment variable named in brackets after its "
        "flag (e.g. SDSERVE_PORT=9000, SDSERVE_API_KEYS=key1,key2); a flag wins over the environment. Any "
        "other SDSERVE_ variable stops the server at start-up (except SDSERVE_CACHE_DIR, which the engines "
        "read).",
    )
    cli.add_argument("role", nargs="?", choices=ROLES, default="standalone",
                     help="standalone (default): one process that renders and serves; node: renders for "
                     "routers; router: the public front door that spreads requests over nodes")
    add_arguments(cli)
    cli.add_argument("--announce", action="store_true", help="print a ready-to-paste example at start-up")
    return cli


def announce(settings: Settings) -> None:
    url = f"http://{settings.host}:{settings.port}"
    print(f"""
sdserve is starting on {url}  (OpenAI base_url: {url}/v1)

  curl {url}/v1/images/generations -H 'Content-Type: application/json' \\
       -d '{{"prompt": "a lighthouse at dusk", "size": "256x256", "response_format": "url"}}'

The built-in demo model (tiny-sd15) has random weights: its images are noise. For real images export a
real model, e.g. `.venv/bin/python -m export sd15` (needs the Hugging Face hub), and restart.
Health: {url}/readyz   API schema: {url}/schema/openapi.json   Stop: Ctrl-C
""" + (f"Playground (open in a browser): {url}/\n" if settings.playground else ""), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = from_sources(args.role, args)
    except InvalidSettings as exc:
        return _refuse(str(exc))
    logs.configure(settings.log_level, settings.log_format)
    log = logging.getLogger("sdserve.server")
    log.info("settings: %s", msgspec.json.encode(settings.masked()).decode())
    if args.announce:
        announce(settings)
    problem = check_role(settings)
    if problem:
        return _refuse(problem)
    try:
        app = create_app(settings)
    except InvalidSettings as exc:
        return _refuse(str(exc))
    # The drain answers what is unfinished at --drain-timeout (503, for a router to send elsewhere); uvicorn
    # waits a little longer so those answers go out before it would cancel the requests itself.
    config = uvicorn.Config(asgi(app), host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=math.ceil(settings.drain_timeout) + ANSWER_SECONDS)
    GracefulServer(config, lambda: on_terminate(app)).run()
    return 0


def _refuse(problem: str) -> int:
    """A configuration the server cannot start with: one line on stderr, exit status 2 (as argparse)."""
    print(f"server: error: {problem}", file=sys.stderr)
    return 2


def check_role(settings: Settings) -> str | None:
    if settings.role == "node":
        if not settings.routers:
            return "a node needs at least one --router URL to register with"
        if not settings.node_token:
            return "a node needs the shared node token (--node-token or SDSERVE_NODE_TOKEN)"
    if settings.role == "router" and not settings.node_token:
        return "a router needs the shared node token (--node-token or SDSERVE_NODE_TOKEN) so that nodes can join"
    return check_fleet(settings) or check_default_model(settings)


def check_fleet(settings: Settings) -> str | None:
    try:
        allowed_networks(tuple(settings.node_networks))
    except ValueError as exc:
        return f"--node-networks: {exc}"
    return None


def check_default_model(settings: Settings) -> str | None:
    """A standalone server knows its models at start-up: a default that names none of them is a typo. (A
    router learns its models from nodes later: it logs a warning and /readyz says so instead.)"""
    name = settings.default_model
    if settings.role != "standalone" or not name or name in settings.model_aliases:
        return None
    found = sorted(path.name for path in discover(settings.models_dir, settings.models))
    if name in found:
        return None
    listed = ", ".join(found) or "none"
    return f"--default-model '{name}' is not a model here (found in {settings.models_dir}: {listed})"


class GracefulServer(uvicorn.Server):
    """uvicorn, with a hook that runs first on SIGTERM/SIGINT (a node starts draining at once), and exit
    status 0 after a graceful shutdown (uvicorn would re-raise the signal and die by it). A second
    Ctrl-C forces the exit, as in uvicorn."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
            return
        self.on_exit()
        self.should_exit = True


if __name__ == "__main__":
    sys.exit(main())
