"""How the app is served: Gradio's options, and a request-body bound in front of every route.

Gradio refuses an upload over `max_file_size`, but a JSON body (an image as a `data:` URL in an API
call) is read whole and parsed before any check: a 300 MB body took 15-30 s to refuse and left the
server ~950 MB larger for good. The bound here answers 413 from the headers, before reading.
"""
from __future__ import annotations

from starlette.middleware import Middleware

from spiq.models.data import MAX_IMAGE_BYTES

# The largest legitimate body: an image at the upload limit sent as a base64 `data:` URL (4/3 of
# its bytes), with room for the rest of the request.
MAX_BODY_BYTES = MAX_IMAGE_BYTES * 4 // 3 + (1 << 20)


class BodyLimit:
    """ASGI middleware: a request whose body is over `max_bytes` gets 413, from its Content-Length
    before a byte is read, or as soon as a body without one (chunked) passes the bound."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send)
        state = {"received": 0, "started": False, "refused": False}

        async def counted():
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            state["received"] += len(message.get("body", b""))
            if state["received"] > self.max_bytes and not state["started"]:
                # answered here: the app sees the client gone, and whatever it answers is dropped
                # (raising instead would reach FastAPI's body parser, which answers 400)
                state["refused"] = True
                await self._refuse(send)
                return {"type": "http.disconnect"}
            return message

        async def tracked(message):
            if not state["refused"]:
                state["started"] = state["started"] or message["type"] == "http.response.start"
                await send(message)

        try:
            await self.app(scope, counted, tracked)
        except Exception:
            if not state["refused"]:
                raise

    async def _refuse(self, send) -> None:
        body = f"Request body over {self.max_bytes >> 20} MB: images are at most {MAX_IMAGE_BYTES >> 20} MB.".encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def launch_options() -> dict:
    """`demo.launch(**launch_options(), ...)`: the upload limit and the body bound, for the app and its tests."""
    return {"max_file_size": MAX_IMAGE_BYTES, "app_kwargs": {"middleware": [Middleware(BodyLimit)]}}
