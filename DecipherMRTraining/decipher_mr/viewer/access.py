"""Who may use a viewer and what it may read: the access token (checked on every HTTP request, the
websocket upgrade and wslink's hello), the folders paths typed in the page must stay inside, and the
upload bound.

>>> gate = TokenGate(resolve_token())            # a fresh random token unless one is given
>>> DataRoots(["demo"]).check("demo/data/images/brain-000.nii.gz", "volume")
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Any

TOKEN_ENV = "DECIPHER_MR_VIEWER_TOKEN"
DEFAULT_MAX_UPLOAD_MB = 2048
REFUSED_PAGE = (
    "<!doctype html><html><head><meta charset=\"utf-8\"><title>DecipherMR viewer: token needed</title></head>"
    "<body><h1>This DecipherMR viewer needs its access token</h1>"
    "<p>Open the address that <code>decipher-mr view</code> printed when it started "
    "(it ends in <code>?secret=&hellip;</code>), or ask the person who started it.</p></body></html>"
)


class PathNotAllowed(PermissionError):
    """A path typed in the page that is outside the viewer's data roots."""


class DataRoots:
    """The folders (and single files) whose contents the page may open by path.

    A path is allowed when, with every symlink resolved, it is one of the roots or lies under one;
    a path with a ``..`` component is refused outright (even when it would resolve inside).
    """

    def __init__(self, roots) -> None:
        self.roots = []
        for root in roots:
            resolved = Path(root).expanduser().resolve()
            if resolved not in self.roots:
                self.roots.append(resolved)

    def check(self, path: str, what: str = "path") -> Path:
        """The resolved path to open, or :class:`PathNotAllowed` with a message for the page."""
        given = Path(str(path).strip()).expanduser()
        if ".." in given.parts:
            raise PathNotAllowed(f"{path}: a {what} with '..' is not accepted; type the full path")
        resolved = given.resolve()
        for root in self.roots:
            if resolved == root or resolved.is_relative_to(root):
                return resolved
        where = ", ".join(str(r) for r in self.roots) or "none"
        link = " (it is a link to somewhere else)" if resolved != given.absolute() else ""
        raise PathNotAllowed(f"{path}: outside the folders this viewer may read{link}; allowed: {where} "
                             "(start `decipher-mr view` with --data-root to allow another folder)")


class TokenGate:
    """The viewer's access token, checked on every HTTP request and on the websocket's ``wslink.hello``.

    * HTTP (aiohttp middleware on the trame server's application): the page, its scripts and the
      websocket upgrade need the token, given as ``?secret=`` (what the printed URL carries; the trame
      client sends it on in ``wslink.hello`` and removes it from the address bar), an
      ``Authorization: token …`` header, or the cookie set when the token was first presented (so that
      reloads and the page's own requests work). Anything else gets :data:`REFUSED_PAGE` with 403.
    * websocket: a wslink link protocol whose ``validateToken`` wslink asks on ``wslink.hello``,
      before it lets the client call anything or sends it any state.

    Tokens are compared in constant time. ``token=None`` lets everyone in (``--no-token``).
    """

    def __init__(self, token: str | None, max_message_bytes: int | None = None) -> None:
        self.token = token
        self.max_message_bytes = max_message_bytes
        self._upgraded: set[str] = set()
        self._web_server = None
        if token:
            digest = hashlib.sha256(token.encode()).hexdigest()
            self.cookie_name = f"dmr-viewer-{digest[:12]}"  # one per token: several viewers on one host
            self._cookie_value = hmac.new(token.encode(), b"decipher-mr viewer cookie", "sha256").hexdigest()

    # --- the secret ---
    def _matches(self, candidate) -> bool:
        return isinstance(candidate, str) and hmac.compare_digest(candidate.encode(), self.token.encode())

    def request_allowed(self, request) -> bool:
        if self.token is None:
            return True
        if self._matches(request.query.get("secret")) or self._matches(request.query.get("token")):
            return True
        header = request.headers.get("Authorization", "")
        if header[:6].lower() == "token " and self._matches(header[6:].strip()):
            return True
        cookie = request.cookies.get(self.cookie_name)
        return isinstance(cookie, str) and hmac.compare_digest(cookie.encode(), self._cookie_value.encode())

    # --- HTTP: aiohttp middleware ---
    def middleware(self):
        from aiohttp import web

        gate = self

        @web.middleware
        async def require_token(request, handler):
            if not gate.request_allowed(request):
                return web.Response(status=403, text=REFUSED_PAGE, content_type="text/html",
                                    headers={"Cache-Control": "no-store"})
            origin = request.headers.get("Origin")
            if request.headers.get("Upgrade", "").lower() == "websocket" and origin:
                from urllib.parse import urlsplit

                if urlsplit(origin).netloc != request.host:  # another site's page opening our websocket
                    return web.Response(status=403, text=REFUSED_PAGE, content_type="text/html")
            request["dmr_token_checked"] = True
            response = await handler(request)
            if gate.token is not None and not response.prepared and request.cookies.get(gate.cookie_name) != gate._cookie_value:
                response.set_cookie(gate.cookie_name, gate._cookie_value, httponly=True, samesite="Strict", path="/")
            return response

        return require_token

    def bind(self, web_server) -> None:
        """``on_server_bind``: put the middleware in front of every route (before aiohttp freezes them)."""
        self._web_server = web_server
        if self.token is not None:
            web_server.app.middlewares.insert(0, self.middleware())

    # --- websocket: wslink link protocol ---
    def link_protocol(self):
        from wslink.websocket import LinkProtocol

        gate = self

        class TokenProtocol(LinkProtocol):
            def onConnect(self, request, client_id):
                if gate.token is None or (hasattr(request, "get") and request.get("dmr_token_checked")):
                    gate._upgraded.add(client_id)
                gate._bound_messages(client_id)

            def onClose(self, client_id):
                gate._upgraded.discard(client_id)

            async def validateToken(self, token, client_id):
                if gate.token is None:
                    return True
                # the secret sent in wslink.hello, or (a reloaded page, whose URL no longer has it)
                # the token or cookie its websocket upgrade request carried
                return gate._matches(token) or client_id in gate._upgraded

        return TokenProtocol()

    def _bound_messages(self, client_id: str) -> None:
        """Once authenticated, wslink lets a client's messages reach 4 GB; keep them to the upload limit,
        refused from the first chunk's declared size, before the bytes are received."""
        if not self.max_message_bytes or self._web_server is None:
            return
        limit = self.max_message_bytes
        for handler in getattr(self._web_server, "_ws_handlers", []):
            unchunker = handler.unchunkers.get(client_id)
            if unchunker is not None:
                original = unchunker.set_max_message_size
                unchunker.set_max_message_size = lambda size, _set=original: _set(min(size, limit))


def resolve_token(token: str | None = None, no_token: bool = False) -> str | None:
    """The token to use: the given one, else ``$DECIPHER_MR_VIEWER_TOKEN``, else a new random secret;
    ``None`` with ``no_token``."""
    if no_token:
        return None
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    if token is not None:
        token = token.strip()
        if len(token) < 8:
            raise ValueError("the token must be at least 8 characters")
        return token
    import secrets

    return secrets.token_urlsafe(32)
