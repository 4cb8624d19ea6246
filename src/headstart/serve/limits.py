"""What one request may ask of the server: body bytes, text length, image pixels, batch size, time.

Every limit is checked before the model runs, and a request over one gets a 4xx naming the limit.
The image pixel limit counts every image of a request together (64 small-on-the-wire, huge-when-decoded
PNGs cannot add up to gigabytes): the sizes are read from the headers and summed before any is decoded,
and the decoding runs in a worker thread within the request timeout. The limit also sets PIL's
decompression-bomb threshold, so a tiny PNG that claims a huge canvas is refused before it is allocated.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from .errors import ApiError, error_body

T = TypeVar("T")

DEFAULT_MAX_ADAPTERS = 64
"""LoRA adapters kept injected per base unless told otherwise: the least recently used is deleted beyond it
(and reloaded from its bundle when asked). A rank-8 adapter of a MiniLM-class base is ~0.3 MB, of a
135M-parameter LM ~2-4 MB, so 64 bound the adapters of one base to tens or a few hundred MB."""
PIL_FLOOR_PIXELS = 2048 * 2048
"""The least PIL's own decompression-bomb limit is set to: far above any base's input size."""


@dataclass
class Limits:
    """The per-request limits of one server."""

    max_body_bytes: int = 16 * 1024 * 1024
    """Largest request body (413 beyond it), counted as it arrives, whatever Content-Length claims."""
    max_text_chars: int = 20_000
    """Longest text input, in characters (413 beyond it)."""
    max_image_pixels: int = 24_000_000
    """Most decoded pixels (width x height) of all the images of one request together (413 beyond it):
    one 24 MP photo, or 64 of 600x600; 72 MB of RGB at most per request."""
    max_batch: int = 64
    """Most inputs one request may carry (413 beyond it)."""
    timeout_s: float = 60.0
    """Longest a request may take to answer (504 beyond it)."""
    max_new_tokens: int = 512
    """Most tokens one generation may produce (requests asking more are capped)."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_text_chars", "max_image_pixels", "max_batch", "max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be above 0, got {self.timeout_s}")

    def apply_to_pil(self) -> None:
        """PIL refuses (DecompressionBombError) images over twice MAX_IMAGE_PIXELS and warns over it. Its
        check also runs on the images our own preprocessing makes (a center crop to the base's input size),
        so it is never set below PIL_FLOOR_PIXELS: a small --max-image-pixels is enforced by our own check
        on each decoded image's size, not by PIL's."""
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = max(self.max_image_pixels, PIL_FLOOR_PIXELS)

    # ---- checks ---------------------------------------------------------------------------------
    def check_batch(self, inputs: list[Any]) -> None:
        if not inputs:
            raise ApiError(422, "empty_input", "`inputs` is an empty list: send at least one input")
        if len(inputs) > self.max_batch:
            raise ApiError(413, "batch_too_large", f"{len(inputs)} inputs in one request; the limit is {self.max_batch}")

    def check_texts(self, inputs: Any) -> list[str]:
        """`inputs` as a list of non-empty strings within the length limit."""
        texts = inputs if isinstance(inputs, list) else [inputs]
        self.check_batch(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ApiError(422, "invalid_input", f"input {i} is a {type(text).__name__}, not a string")
            if not text.strip():
                raise ApiError(422, "empty_input", f"input {i} is an empty text")
            if len(text) > self.max_text_chars:
                raise ApiError(413, "text_too_long", f"input {i} has {len(text)} characters; the limit is "
                                                     f"{self.max_text_chars}")
        return texts

    def decode_image(self, data: bytes, what: str = "the body"):
        """Bytes -> an RGB PIL image within the pixel limit, or a 4xx naming the problem."""
        return self.decode_images([data], [what])[0]

    def decode_images(self, blobs: Sequence[bytes], whats: Sequence[str]) -> list[Any]:
        """Image files -> RGB PIL images, if all their pixels together are within the limit (read from the
        headers, before any is decoded); else a 4xx naming the problem. Blocking: call it off the loop."""
        opened, total = [], 0
        try:
            for data, what in zip(blobs, whats):
                img = self._open_within_limit(data, what)
                opened.append(img)
                total += img.size[0] * img.size[1]
                if total > self.max_image_pixels:
                    raise ApiError(413, "image_too_large", f"the images of this request total over {total} pixels "
                                                           f"(at {what}); the limit is {self.max_image_pixels}")
            return [self._rgb(img, what) for img, what in zip(opened, whats)]
        finally:
            for img in opened:
                img.close()

    def decode_base64_images(self, texts: Sequence[Any], whats: Sequence[str]) -> list[Any]:
        """Base64 strings (or `data:image/...;base64,` URLs) -> PIL images, as `decode_images`."""
        return self.decode_images([self._base64_bytes(t, w) for t, w in zip(texts, whats)], whats)

    def decode_base64_image(self, text: Any, what: str):
        """A base64 string (or a `data:image/...;base64,` URL) -> a PIL image."""
        return self.decode_base64_images([text], [what])[0]

    async def decode_off_loop(self, decode: Callable[..., T], *args: Any) -> T:
        """Run a blocking decode in a worker thread, within the request timeout (the loop keeps serving)."""
        return await self.within_time(asyncio.to_thread(decode, *args))

    def _open_within_limit(self, data: bytes, what: str):
        from PIL import Image

        if not data:
            raise ApiError(422, "empty_input", f"{what} holds no image bytes")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
                img = Image.open(io.BytesIO(data))  # lazy: reads the header only
        except Image.DecompressionBombError:
            raise ApiError(413, "image_too_large", f"{what} claims more than {self.max_image_pixels} pixels") from None
        except Exception:  # UnidentifiedImageError, OSError, struct.error, ...: PIL's decoders raise many kinds
            raise ApiError(422, "invalid_image", f"{what} is not a readable image (PNG, JPEG, ...)") from None
        width, height = img.size
        if width * height > self.max_image_pixels:
            img.close()
            raise ApiError(413, "image_too_large", f"{what} is {width}x{height} pixels; the limit is "
                                                   f"{self.max_image_pixels} pixels")
        return img

    @staticmethod
    def _rgb(img: Any, what: str):
        from PIL import Image

        try:
            return img.convert("RGB")
        except Image.DecompressionBombError:
            raise ApiError(413, "image_too_large", f"{what} is over the pixel limit") from None
        except Exception:  # a truncated or corrupt body shows only when decoded
            raise ApiError(422, "invalid_image", f"{what} is not a readable image (PNG, JPEG, ...)") from None

    @staticmethod
    def _base64_bytes(text: Any, what: str) -> bytes:
        if not isinstance(text, str):
            raise ApiError(422, "invalid_input", f"{what} must be a base64 string, not a {type(text).__name__}")
        if text.startswith("data:"):
            text = text.partition(",")[2]
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, "invalid_image", f"{what} is not valid base64") from None

    async def within_time(self, work: Awaitable[T]) -> T:
        """Await `work`, or answer 504 after `timeout_s`."""
        try:
            return await asyncio.wait_for(work, self.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"the answer took longer than {self.timeout_s:g} s") from None


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` gets 413 before the route reads it all (pure ASGI, so
    streamed responses such as server-sent events pass through untouched)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                return await _reply(send, 400, "invalid_request", "Content-Length is not a number")
            if too_big:
                return await _reply(send, 413, "body_too_large", f"the body is over {self.max_bytes} bytes")
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, "body_too_large", f"the body is over {self.max_bytes} bytes")
            return message

        await self.app(scope, counted, send)


async def _reply(send, status: int, code: str, message: str) -> None:
    import json

    body = json.dumps(error_body(code, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
