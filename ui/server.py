"""Serving the app: the Gradio launch, a back-off for wrong logins, and the address as it is really served.

:func:`launch` is what ``python app.py`` runs (and what the HTTP tests run): the app is served with
``allowed_paths`` fixed to :attr:`ui.workspace.Workspace.served` (the workspace's ``outputs/`` and
``thumbnails/``), uploads no larger than a zip may unpack to, without Gradio's run history (see :func:`launch`),
and, with a login, behind :class:`LoginBackoff`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import ipaddress
import json
import socket
import time
from collections.abc import Callable
from typing import Any

LOOPBACK_NAMES = ("localhost",)
ALL_INTERFACES = ("0.0.0.0", "", "::")


# ----- wrong logins ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Client:
    failures: int = 0
    last_failure: float = 0.0
    waiting: int = 0  # login requests of this client in line now
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)


class LoginThrottle:
    """Per-client back-off after wrong logins.

    After ``n`` wrong logins in a row from one address, its next attempt waits ``base · 2^(n-1)`` seconds (at
    most ``max_delay``) before the password is even checked; a right one clears the count, and so does
    ``forget_after`` seconds without a wrong one. One address's attempts are answered one at a time, so parallel
    guesses wait in line; more than ``max_waiting`` in line are refused at once (HTTP 429). At most
    ``max_clients`` addresses are remembered, the ones that failed longest ago are forgotten first.
    """

    def __init__(self, base: float = 0.5, max_delay: float = 30.0, forget_after: float = 900.0,
                 max_clients: int = 4096, max_waiting: int = 8, clock: Callable[[], float] = time.monotonic):
        self.base, self.max_delay, self.forget_after = base, max_delay, forget_after
        self.max_clients, self.max_waiting, self.clock = max_clients, max_waiting, clock
        self.clients: collections.OrderedDict[str, _Client] = collections.OrderedDict()

    def client(self, address: str) -> _Client:
        state = self.clients.get(address)
        if state is None or (not state.waiting and self.clock() - state.last_failure > self.forget_after):
            state = self.clients[address] = _Client()
        self.clients.move_to_end(address)
        while len(self.clients) > self.max_clients:
            oldest = next((key for key, value in self.clients.items() if not value.waiting), None)
            if oldest is None or oldest == address:
                break
            del self.clients[oldest]
        return state

    def delay(self, address: str) -> float:
        """Seconds the next attempt from ``address`` waits (0 after no wrong login)."""
        state = self.clients.get(address)
        if state is None or not state.failures:
            return 0.0
        wait = min(self.max_delay, self.base * 2 ** (state.failures - 1))
        return max(0.0, state.last_failure + wait - self.clock())

    def failed(self, address: str) -> None:
        state = self.client(address)
        state.failures += 1
        state.last_failure = self.clock()

    def succeeded(self, address: str) -> None:
        state = self.clients.get(address)
        if state is not None:  # kept (with its lock): attempts already in line stay in line
            state.failures = 0


class LoginBackoff:
    """ASGI middleware applying a :class:`LoginThrottle` to Gradio's ``POST /login``, keyed by the client's
    address (uvicorn takes it from ``X-Forwarded-For`` only when the request comes from 127.0.0.1, i.e. from a
    reverse proxy on this machine)."""

    def __init__(self, app: Any, throttle: LoginThrottle):
        self.app, self.throttle = app, throttle

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" \
                or not scope.get("path", "").rstrip("/").endswith("/login"):
            await self.app(scope, receive, send)
            return
        address = (scope.get("client") or ("unknown",))[0]
        state = self.throttle.client(address)
        if state.waiting >= self.throttle.max_waiting:
            await _refuse(send, "too many login attempts from this address at once; wait and try again")
            return
        state.waiting += 1
        try:
            async with state.lock:
                wait = self.throttle.delay(address)
                if wait > 0:
                    await asyncio.sleep(wait)

                async def watch(message: dict) -> None:
                    if message["type"] == "http.response.start":  # counted before the client hears the answer
                        if message["status"] < 300:
                            self.throttle.succeeded(address)
                        elif message["status"] in (400, 401, 403):
                            self.throttle.failed(address)
                    await send(message)

                await self.app(scope, receive, watch)
        finally:
            state.waiting -= 1


async def _refuse(send: Callable, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": 429,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", b"5")]})
    await send({"type": "http.response.body", "body": body})


# ----- the address -------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def network_address() -> str | None:
    """This machine's address on its network (the one its default route uses), or None when there is none."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # a documentation address: connecting a UDP socket sends nothing
            address = probe.getsockname()[0]
    except OSError:
        try:
            address = socket.gethostbyname(socket.gethostname())
        except OSError:
            return None
    return None if ipaddress.ip_address(address).is_loopback or address == "0.0.0.0" else address


def describe_address(host: str, port: int, auth: bool, workspace: str = "") -> tuple[str, str | None]:
    """(what ``python app.py`` prints about where it listens, a warning or None)."""
    where = f"  (workspace {workspace})" if workspace else ""
    if host in ALL_INTERFACES:
        shown = "::" if host == "::" else "0.0.0.0"
        local = _url("::1" if host == "::" else "127.0.0.1", port)
        outside = network_address()
        reach = f" and {_url(outside, port)} from other machines" if outside else \
            " and this machine's network address from other machines"
        message = (f"Rankwright web UI: listening on all network interfaces ({shown}, port {port}): {local} on this "
                   f"machine{reach}{where}")
    else:
        message = f"Rankwright web UI: {_url(host, port)}{where}"
    warning = None
    if not is_loopback(host) and not auth:
        warning = (f"warning: the UI listens beyond this machine ({host or '0.0.0.0'}:{port}) without --auth: anyone "
                   "who can reach this port can train, read what runs wrote and edit the datasets. Start it with "
                   "--auth USER:PASS, and put a reverse proxy with TLS in front of it (README, Security).")
    return message, warning


# ----- launching ---------------------------------------------------------------------------------------------
def launch(ws: Any, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None,
           throttle: LoginThrottle | None = None, ui: Any = None,
           tensorboard_url: str | None = None) -> tuple[Any, Any]:
    """Build and start the app on ``host:port`` (returns at once; ``demo.block_thread()`` waits); ``ui``: the
    callbacks (a RankwrightUI of ``ws``; a new one by default); ``tensorboard_url``: where the operator's
    TensorBoard is (the Training tab links it). Raises OSError when the port cannot be used."""
    from starlette.middleware import Middleware

    from ui.app import CSS, THEME, RankwrightUI, build_app
    from ui.workspace import MAX_ZIP_TOTAL_BYTES

    ui = ui or RankwrightUI(ws, tensorboard_url=tensorboard_url)
    demo, ui = build_app(ws, ui)
    demo.queue(default_concurrency_limit=2)
    middleware = [Middleware(LoginBackoff, throttle=throttle or LoginThrottle())] if auth else []
    # run_history=False: Gradio's browser client would otherwise log every call in localStorage (its inputs and its
    # components' props: ~90k characters per form change here) and parse and rewrite that whole log, up to 100
    # calls, on each message of each call. After some use a reloaded page spent 40-60 s of main-thread time on it
    # (a busy 2-core machine froze past a 60 s click), and the log kept the form, which BrowserState encrypts, in
    # plain text. Off, the client also deletes a log left by an earlier start.
    demo.launch(server_name=host, server_port=port, auth=auth, allowed_paths=list(ui.allowed_paths), theme=THEME,
                css=CSS, show_error=True, quiet=True, prevent_thread_lock=True, inbrowser=False, footer_links=[],
                run_history=False, max_file_size=MAX_ZIP_TOTAL_BYTES, app_kwargs={"middleware": middleware})
    return demo, ui


def start_tensorboard(logdir: str, port: int) -> tuple[Any, str]:
    """``tensorboard --logdir LOGDIR`` on 127.0.0.1:``port`` (TensorBoard has no login: it never listens beyond
    this machine), as the operator's ``python app.py --tensorboard PORT`` asks; (process, its URL)."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--port", str(port), "--host",
               "127.0.0.1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL)
    return process, f"http://127.0.0.1:{port}/"
