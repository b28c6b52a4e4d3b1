"""Forms of the webmail's POSTs (RFC 7578 multipart/form-data, URL-encoded forms): read once per
request, bounded, and their fields as strings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from aiohttp import BodyPartReader, web
from multidict import MultiDict

__all__ = ["MAX_UPLOAD", "Upload", "_field", "_form", "_q"]

MAX_UPLOAD = 25 * 1024 * 1024  # a whole compose form, attachments included


@dataclass(frozen=True, slots=True)
class Upload:
    filename: str
    data: bytes


_FORM_KEY = web.RequestKey("postier_webmail_form", MultiDict)


async def _form(request: web.Request) -> MultiDict[str | Upload]:
    """The POSTed form, read once. A multipart form (compose with attachments) is streamed here with
    its own bound, MAX_UPLOAD in all, since the HTTP app's body limit is for small requests."""
    if _FORM_KEY in request:
        cached: MultiDict[str | Upload] = request[_FORM_KEY]
        return cached
    out: MultiDict[str | Upload] = MultiDict()
    if request.content_type == "multipart/form-data":
        if request.content_length is not None and request.content_length > MAX_UPLOAD:
            raise web.HTTPRequestEntityTooLarge(MAX_UPLOAD, request.content_length)
        reader = await request.multipart()
        total = 0
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or not part.name or len(out) >= 200:
                raise web.HTTPBadRequest(text="bad form\n")
            data = bytearray()
            while chunk := await part.read_chunk(65536):
                total += len(chunk)
                if total > MAX_UPLOAD:
                    raise web.HTTPRequestEntityTooLarge(MAX_UPLOAD, total)
                data += chunk
            if part.filename is not None:
                out.add(part.name, Upload(part.filename, bytes(data)))
            else:
                out.add(part.name, data.decode("utf-8", "replace"))
    else:
        for k, v in (await request.post()).items():
            if isinstance(v, str):
                out.add(k, v)
    request[_FORM_KEY] = out
    return out


def _q(**kw: object) -> str:
    return urlencode({k: str(v) for k, v in kw.items()})


def _field(form: Any, name: str) -> str:
    v = form.get(name)
    return v if isinstance(v, str) else ""
