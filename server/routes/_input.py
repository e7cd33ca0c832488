"""Bounded input, for every surface: bodies, headers and query numbers a client sends.

Whatever arrives, the answer is a 4xx JSON error, never a 5xx:

- :func:`read_body`: the body within ``DAC_BODY_TIMEOUT_S`` (else ``408``) and
  ``DAC_MAX_BODY_BYTES`` (else ``413``, after decompression too); a body whose
  ``Content-Encoding`` cannot be decoded is ``400``. After a failed body the
  connection is closed, since what follows on it cannot be trusted.
- :func:`check_depth`: JSON nested deeper than :data:`MAX_DEPTH` is ``400``
  (the coalesce key and the upstream request encode it again, and their
  encoders stop far below what a parser accepts).
- :func:`header_text`: a header value that is not UTF-8 is ``400``.
- :func:`whole_number`: a query number in ASCII digits within a range, else ``400``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from ..appkeys import CLOSE_AFTER, SETTINGS
from ..config import Settings
from ..errors import BadRequest, PayloadTooLarge, RequestTimeout

__all__ = ["MAX_DEPTH", "check_depth", "header_text", "read_body", "whole_number"]

#: JSON nesting a request may use (tool schemas need a few dozen levels at most)
MAX_DEPTH = 64


def _give_up_on_connection(request: web.Request) -> None:
    """The body is broken: answer, then close the connection instead of reading on."""
    request[CLOSE_AFTER] = True
    request.content.feed_eof()


async def read_body(request: web.Request, settings: Settings | None = None) -> bytes:
    settings = settings or request.config_dict[SETTINGS]
    try:
        if request.content.is_eof():  # all of it is here: nothing to wait for, no timer
            return await request.read()
        async with asyncio.timeout(settings.body_timeout_s):
            return await request.read()
    except TimeoutError:
        _give_up_on_connection(request)
        raise RequestTimeout(f"the request body did not arrive within {settings.body_timeout_s:g}s "
                             "(DAC_BODY_TIMEOUT_S)") from None
    except web.HTTPRequestEntityTooLarge:
        _give_up_on_connection(request)
        raise PayloadTooLarge(f"request body too large (limit {settings.max_body_bytes} bytes, "
                              "DAC_MAX_BODY_BYTES)", limit="max_body_bytes") from None
    except RequestPayloadError as exc:
        _give_up_on_connection(request)
        encoding = request.headers.get("Content-Encoding")
        what = f"cannot be decoded as {encoding!r}" if encoding else "is malformed"
        raise BadRequest(f"the request body {what} ({exc.__class__.__name__})") from None


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """Raise a 400 when ``value`` nests arrays or objects deeper than ``limit``."""
    level: list[Any] = [value]
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            raise BadRequest(f"the request body nests deeper than {limit} levels")
        below: list[Any] = []
        for item in level:
            if isinstance(item, dict):
                below.extend(v for v in item.values() if isinstance(v, dict | list))
            elif isinstance(item, list):
                below.extend(v for v in item if isinstance(v, dict | list))
        level = below


def header_text(request: web.Request, name: str) -> str | None:
    """A header's value, or a 400 when it is not UTF-8 text."""
    value = request.headers.get(name)
    if value is None:
        return None
    try:
        value.encode()
    except UnicodeEncodeError:
        raise BadRequest(f"header {name} must be UTF-8 text", param=name) from None
    return value


def whole_number(request: web.Request, name: str, default: int, *, low: int, high: int) -> int:
    """The query parameter ``name`` as a whole number from ``low`` to ``high``, else a 400."""
    raw = request.query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise BadRequest(f"{name} must be a whole number from {low} to {high}", param=name)
    return int(raw)
