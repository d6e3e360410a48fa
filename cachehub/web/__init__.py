"""The dashboard and its JSON API: the HTTP layer, and nothing else.

Starlette routes render ``cachehub.views`` (one function per page, whose dict is also the
page's JSON twin under ``/api``) through Jinja2 templates shipped in the package, with static
assets from the package too (sites are often offline: no CDN). Actions call the library
(``cachehub.Hub``). ``cachehub daemon`` serves this app beside its background jobs (and adds
``/status``, ``/metrics``, ``/healthz``, ``/readyz``); ``cachehub ui`` serves it alone.

Security (docs/dashboard.md):

- every action (``POST /api/...``) needs the token from ``--token-file``: an
  ``Authorization: Bearer`` header, or the browser's session cookie (set by ``/login``) together
  with the page's CSRF token; without a token file there are no actions at all;
- read-only pages need no token only while the server is bound to loopback; ``listen`` on any
  other address without a token file is refused before the socket opens;
- the token is compared in constant time, never logged, never put in a URL or a page.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Callable
from hashlib import sha256
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from cachehub import views
from cachehub.config import Settings
from cachehub.context import Context
from cachehub.errors import AmbiguousRefError, CachehubError, ConfigError, ConflictError, InvalidRefError, NotCachedError

log = logging.getLogger("cachehub.web")
HERE = Path(__file__).parent
COOKIE = "cachehub_session"


class Auth:
    """The token, and what the browser holds instead of it: a session cookie and a CSRF token,
    both HMACs of the token (so a server restart keeps sessions valid, and neither reveals it)."""

    def __init__(self, token: str | None, *, loopback: bool) -> None:
        self.token = token
        self.loopback = loopback

    def _mac(self, what: str) -> str:
        assert self.token is not None
        return hmac.new(self.token.encode(), what.encode(), sha256).hexdigest()

    @property
    def session(self) -> str:
        return self._mac("session")

    @property
    def csrf(self) -> str:
        return self._mac("csrf") if self.token else ""

    def check_token(self, given: str) -> bool:
        return self.token is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def bearer(self, request: Any) -> bool:
        header = request.headers.get("authorization", "")
        return header.lower().startswith("bearer ") and self.check_token(header[7:].strip())

    def cookie(self, request: Any) -> bool:
        return self.token is not None and hmac.compare_digest(request.cookies.get(COOKIE, "").encode(), self.session.encode())

    def may_read(self, request: Any) -> bool:
        """Pages need no token only for a client on this machine, reaching a loopback-bound
        server (a proxy on the same host passes the real client through X-Forwarded-For,
        which uvicorn trusts from 127.0.0.1 only)."""
        client = request.client.host if request.client else ""
        return (self.loopback and is_loopback(client)) or self.bearer(request) or self.cookie(request)


def load_token(path: str | None) -> str | None:
    """The token from ``--token-file`` (first line, stripped); a clear error if unusable."""
    if not path:
        return None
    try:
        token = Path(path).read_text().strip().splitlines()[0].strip()
    except (OSError, IndexError) as exc:
        raise ConfigError(f"cannot read a token from --token-file {path}: {exc}; write one line, e.g. `openssl rand -hex 32 > {path}`") from None
    if len(token) < 16:
        raise ConfigError(f"the token in {path} is shorter than 16 characters: use a long random one (`openssl rand -hex 32`)")
    return token


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_app(settings: Settings, *, token: str | None, loopback: bool, daemon: Any = None) -> Any:
    """The Starlette application for ``settings``' catalog and sites."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, RedirectResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
    from starlette.templating import Jinja2Templates

    from cachehub import server
    from cachehub.fsutil import human_bytes

    auth = Auth(token, loopback=loopback)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["size"] = lambda n: "-" if n is None else human_bytes(n)
    templates.env.filters["duration"] = _duration
    templates.env.filters["pct"] = lambda f: "-" if f is None else f"{f * 100:.0f}%"
    templates.env.globals["quote"] = lambda s: quote(str(s), safe="")

    def context() -> Context:
        return Context(settings)

    def page(name: str, build: Callable[[Request, Context], dict]) -> tuple[Callable, Callable]:
        """An HTML page and its JSON twin from one view function."""

        def data(request: Request) -> dict:
            with context() as ctx:
                return build(request, ctx)

        def html(request: Request) -> Response:
            if not auth.may_read(request):
                return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
            try:
                body = data(request)
            except CachehubError as exc:
                return _error_page(templates, request, auth, exc)
            return templates.TemplateResponse(request, f"{name}.html", {"data": body, "auth": auth, "page_name": name,
                                              "can_act": auth.cookie(request), "query": dict(request.query_params)})  # fmt: skip

        def api(request: Request) -> Response:
            if not auth.may_read(request):
                return JSONResponse({"error": "authentication required: send Authorization: Bearer <token>"}, status_code=401)
            try:
                return JSONResponse(data(request))
            except CachehubError as exc:
                return JSONResponse({"error": str(exc), "exit_code": exc.exit_code}, status_code=_status(exc))

        return html, api

    def num(request: Request, name: str = "page") -> int:
        try:
            return max(1, int(request.query_params.get(name, "1")))
        except ValueError:
            return 1

    pages = {
        "datasets": ("/", lambda r, ctx: views.datasets(ctx)),
        "dataset": ("/datasets/{name}", lambda r, ctx: views.dataset(ctx, r.path_params["name"], page=num(r))),
        "commit": ("/datasets/{name}/{ref}", lambda r, ctx: views.commit(ctx, f"{r.path_params['name']}@{r.path_params['ref']}", page=num(r))),
        "lineage": ("/lineage/{name}/{ref}", lambda r, ctx: views.graph(ctx, f"{r.path_params['name']}@{r.path_params['ref']}")),
        "sites": ("/sites", lambda r, ctx: views.sites(ctx)),
        "runs": ("/runs", lambda r, ctx: views.runs(ctx)),
        "run": ("/runs/{run_id}", lambda r, ctx: views.run(ctx, r.path_params["run_id"])),
        "audit": ("/audit", lambda r, ctx: views.audit(ctx, page=num(r), **{k: r.query_params.get(k) for k in ("dataset", "action", "user", "site")})),
    }
    routes: list[Any] = []
    for name, (path, build) in pages.items():
        html, api = page(name, build)
        routes.append(Route(path, html, name=name))
        routes.append(Route("/api" + ("/datasets" if path == "/" else path), api, name=f"api-{name}"))

    # -- actions -------------------------------------------------------------------------------
    async def action(request: Request) -> Response:
        kind = request.path_params["action"]
        is_form = request.headers.get("content-type", "").startswith(("application/x-www-form-urlencoded", "multipart/form-data"))
        # who is asking, before reading any body
        if auth.token is None:
            return _refuse(is_form, 403, "actions are off: start the server with --token-file to allow them", request)
        by_bearer = auth.bearer(request)
        if not by_bearer and not auth.cookie(request):
            return _refuse(is_form, 401, "authentication required: send Authorization: Bearer <token>, or log in", request)
        try:
            body = dict(await request.form()) if is_form else await request.json()
        except ValueError:
            return JSONResponse({"error": "send a JSON object or a form"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "send a JSON object"}, status_code=400)
        if not by_bearer:  # a browser's cookie: the page's CSRF token must come with it
            given = str(body.get("csrf", "")) or request.headers.get("x-csrf-token", "")
            if not hmac.compare_digest(given.encode(), auth.csrf.encode()):
                return _refuse(is_form, 403, "missing or wrong CSRF token: reload the page and try again", request)
        try:
            result = await run_in_threadpool(_act, settings, kind, body)
        except CachehubError as exc:
            if is_form:
                return _back(request, error=str(exc))
            return JSONResponse({"error": str(exc), "exit_code": exc.exit_code}, status_code=_status(exc))
        if is_form:
            return _back(request, done=result["message"])
        return JSONResponse(result, status_code=202 if kind == "cache" else 200)

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return templates.TemplateResponse(request, "login.html", {"auth": auth, "data": {}, "page_name": "login", "query": dict(request.query_params)})
        form = await request.form()
        target = str(form.get("next") or "/")
        if not target.startswith("/") or target.startswith("//"):
            target = "/"
        if not auth.check_token(str(form.get("token", ""))):
            return templates.TemplateResponse(request, "login.html", {"auth": auth, "data": {"error": "wrong token"}, "page_name": "login",
                                                                       "query": {"next": target}}, status_code=401)  # fmt: skip
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, auth.session, httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    async def logout(request: Request) -> Response:
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    routes += [
        Route("/api/{action:str}", action, methods=["POST"]),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/healthz", lambda r: Response(b"ok\n", media_type="text/plain")),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    if daemon is not None:
        for path, fn in server.ROUTES.items():  # /status is a page; /metrics and the probes are open
            routes.append(Route(path, _source_route(fn, daemon, auth if path == "/status" else None)))
    middleware = []
    if loopback:  # a page on loopback must not be readable through DNS rebinding: loopback names only
        from starlette.middleware import Middleware
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        hosts = ["127.0.0.1", "localhost", "[::1]", "::1", *filter(None, os.environ.get("CACHEHUB_UI_HOSTS", "").split(","))]
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=hosts))
    app = Starlette(routes=routes, middleware=middleware)
    app.state.auth = auth
    app.state.settings = settings
    return app


def _check_chains(settings: Settings, stop: threading.Event) -> None:
    """The audit page's full chain check, off the request path: at start, then every
    ``views.FULL_CHAIN_CHECK`` seconds, until ``stop`` (the server's close)."""
    while not stop.is_set():
        try:
            with Context(settings) as ctx:
                views.chain_state(ctx, full=True)
        except Exception as exc:  # noqa: BLE001 - a failed check is retried, and said on the page
            log.warning("audit chain check failed: %s", exc)
        stop.wait(views.FULL_CHAIN_CHECK)


ACTIONS = ("cache", "pin", "unpin", "evict", "subscribe", "unsubscribe")


def _act(settings: Settings, kind: str, body: dict) -> dict:
    """Run one action through the library; the result says what happened."""
    from cachehub.api import Hub

    if kind not in ACTIONS:
        raise CachehubError(f"unknown action {kind!r}: one of {', '.join(ACTIONS)}")
    ref, site = str(body.get("ref") or ""), (str(body.get("site")) if body.get("site") else None)
    if not ref:
        raise InvalidRefError("send the commit as 'ref' (NAME@REF)")
    with Hub(settings) as hub:
        if kind == "cache":
            request = hub.cache_async(ref, site=site)
            return {"action": kind, "ref": ref, "site": site, "request": request.name, "message": f"asked {site or 'the default site'} to cache {ref}"}
        if kind == "pin":
            changed = hub.pin(ref, site=site, reason=str(body.get("reason") or "dashboard"))
        elif kind == "unpin":
            changed = hub.unpin(ref, site=site)
        elif kind == "evict":
            _plan, done = hub.evict([ref], site=site, reason="manual")
            changed = bool(done and done.evicted)
        elif kind == "subscribe":
            hub.subscribe(ref, site=site, every=str(body.get("every") or "10m"))
            changed = True
        else:
            changed = hub.unsubscribe(ref, site=site)
    return {"action": kind, "ref": ref, "site": site, "changed": changed, "message": f"{kind} {ref}: {'done' if changed else 'nothing to do'}"}


def _status(exc: CachehubError) -> int:
    if isinstance(exc, (InvalidRefError, AmbiguousRefError, ConfigError)):
        return 400
    if isinstance(exc, (LookupError, NotCachedError)):  # unknown dataset, ref, site or run; not cached
        return 404
    if isinstance(exc, ConflictError):
        return 409
    return 500


def _refuse(is_form: bool, status: int, message: str, request: Any) -> Any:
    from starlette.responses import JSONResponse

    if is_form:
        return _back(request, error=message, status=status)
    return JSONResponse({"error": message}, status_code=status)


def _back(request: Any, *, done: str | None = None, error: str | None = None, status: int = 303) -> Any:
    """After a form: back to the page it came from, with the outcome in the query."""
    from starlette.responses import RedirectResponse

    from urllib.parse import urlsplit

    referer = urlsplit(request.headers.get("referer", ""))
    path = referer.path if referer.netloc == request.url.netloc else "/"  # back to this server only
    if not path.startswith("/") or path.startswith(("//", "/\\")):
        path = "/"
    query = urlencode({"done": done} if done else {"error": error or ""})
    return RedirectResponse(f"{path}?{query}", status_code=303 if status in (301, 302, 303) else 303)


def _error_page(templates: Any, request: Any, auth: Auth, exc: CachehubError) -> Any:
    return templates.TemplateResponse(request, "error.html", {"data": {"error": str(exc)}, "auth": auth, "page_name": "error", "query": {}},
                                      status_code=_status(exc))  # fmt: skip


def _source_route(fn: Callable, source: Any, auth: Auth | None) -> Callable:
    from starlette.responses import JSONResponse, Response

    def endpoint(request: Any) -> Any:
        if auth is not None and not auth.may_read(request):
            return JSONResponse({"error": "authentication required: send Authorization: Bearer <token>"}, status_code=401)
        body, ctype, *code = fn(source)
        return Response(body, media_type=ctype, status_code=code[0] if code else 200)

    return endpoint


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    days, hours, minutes = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m" if minutes else f"{s}s"


class Server:
    """The app served by uvicorn on its own thread; ``close()`` stops it."""

    def __init__(self, app: Any, sock: socket.socket) -> None:
        import uvicorn

        self._sock = sock
        self._stop = threading.Event()
        if getattr(app.state, "settings", None) is not None:
            threading.Thread(target=_check_chains, args=(app.state.settings, self._stop), name="cachehub-audit-check", daemon=True).start()
        # log_config=None: uvicorn's records go through the process's own handlers (--log-format json)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", log_config=None)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="cachehub-http", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"{host}:{port}"

    def close(self) -> None:
        self._stop.set()
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


def bind(listen: str, *, token: str | None) -> tuple[socket.socket, bool]:
    """Open the listening socket for ``HOST:PORT`` (port 0: a free one); refuse, before it
    opens, a non-loopback address without a token."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    loopback = is_loopback(host)
    if not loopback and token is None:
        raise ConfigError(
            f"refusing to listen on {listen} without a token: anyone who can reach it could read the dashboard; "
            "pass --token-file FILE (one line, e.g. `openssl rand -hex 32 > FILE`), or listen on 127.0.0.1"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock, loopback


def serve(settings: Settings, listen: str, *, token: str | None = None, daemon: Any = None) -> Server:
    """Serve the dashboard (and, for a daemon, its status routes) on ``listen`` in a thread."""
    sock, loopback = bind(listen, token=token)
    return Server(create_app(settings, token=token, loopback=loopback, daemon=daemon), sock)
