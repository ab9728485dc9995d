"""The web app's guards: loopback Host names only (DNS rebinding), an upload size limit enforced
before any parsing, and security headers (CSP, nosniff, no framing)."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import InvalidInput

LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]
# Strict for the gallery; the OpenAPI page (Swagger UI) needs its inline script and styles.
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
DOCS_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self' 'unsafe-inline'; object-src 'none'; frame-ancestors 'none'")


class UploadTooLarge(InvalidInput):
    """An upload over the server's size limit."""


def allowed_hosts_for(host: str) -> list[str] | None:
    """Host names to answer to when bound to `host`: loopback names only when bound to loopback."""
    if host in ("127.0.0.1", "localhost", "::1") or host.startswith("127."):
        return [*LOOPBACK_NAMES, host]
    return None


class UploadLimit:
    """Refuses request bodies over the limit before anything parses or spools them."""

    def __init__(self, app: ASGIApp, limit: int, respond):
        self.app, self.limit, self.respond = app, limit, respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            response = self.respond(Request(scope), 413, too_large(self.limit))
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # chunked upload without a Content-Length
                raise HTTPException(413, too_large(self.limit))
            return message

        await self.app(scope, limited, send)


def too_large(limit: int) -> str:
    return (f"the upload is larger than the server's limit of {limit / (1024 * 1024):g} MB "
            "(`vecsearch serve --max-upload-mb`)")


class LoopbackHostOnly:
    """Answers only requests whose Host is a loopback name (DNS rebinding); others get the usual
    error page or JSON, 400."""

    def __init__(self, app: ASGIApp, allowed: list[str], respond):
        self.app, self.allowed, self.respond = app, set(allowed), respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        host = Headers(scope=scope).get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name not in self.allowed:
            response = self.respond(Request(scope), 400, f"invalid Host header {host[:100]!r}: this "
                                    "server answers to loopback names only (127.0.0.1, localhost)")
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class SecurityHeaders:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        docs = scope["path"].startswith("/api/docs")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                headers += [(b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"same-origin"),
                            (b"x-frame-options", b"DENY")]
                headers.append((b"content-security-policy", (DOCS_CSP if docs else CSP).encode()))
            await send(message)

        await self.app(scope, receive, with_headers)


def same_origin_only(request: Request) -> None:
    """Refuse (403) a state-changing request that a page of another site could have sent: its
    Origin (or, without one, its Referer) must be this server's own scheme://host[:port]. Cookies
    are not needed for such a forgery here (the gallery has no login), so this check is the guard."""
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    origin = request.headers.get("origin")
    if origin is None:
        referer = request.headers.get("referer", "")
        origin = referer if referer.startswith(own + "/") or referer == own else ""
        origin = own if origin else None
    if origin != own or request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise HTTPException(403, f"refused: this form must be sent from the gallery's own pages ({own}), "
                                 "not from another site (Origin or Referer header)")


def not_cross_site(request: Request) -> None:
    """Refuse (403) a JSON API write that a browser sent for a page of another site. Browsers
    name the origin of every cross-origin POST (Origin, Sec-Fetch-Site); a client that names
    none (curl, a script) is no page of another site, and a JSON body cannot be sent across
    sites without a CORS preflight, which this server never grants."""
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    origin = request.headers.get("origin")
    if (origin is not None and origin != own) or \
            request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise HTTPException(403, f"refused: a page of another site ({origin or 'cross-site'}) cannot "
                                 "store decisions in this gallery")
