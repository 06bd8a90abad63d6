"""What the HTTP API accepts and answers: request bodies, their bounds, the one error shape and its statuses.

Every number a client sends is bounded here (ids to int64, counts to what a request may ask for), so bad input is
a 422 with a hint before it reaches the index, and every error status an endpoint can answer is declared in the
OpenAPI document (:data:`ERROR_RESPONSES`), so that a client, or Schemathesis run from ``/openapi.json``, can check
the server against it (``tests/test_fuzz_http.py``).
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Path as PathParam
from fastapi import Request, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

#: Hits per request: large enough for any page, small enough that one request cannot pin a worker for minutes.
MAX_N = 1000
#: Thumbnail sizes the API accepts (pixels, longest side); bounded so a client cannot fill the cache disk.
THUMB_MIN, THUMB_MAX = 32, 1024
#: Ids the API takes: row ids are SQLite's and FAISS's int64, but a JSON number is a double, exact only up to 2^53
#: (JavaScript's Number.MAX_SAFE_INTEGER). A larger bound would let a schema check in doubles (a client's, or
#: Schemathesis's) call an id valid that the server refuses; row ids of a real index are far below either.
MAX_ID = 2**53 - 1
#: Name of the one index in the clip-retrieval endpoints (``/indices-list``, ``indice_name``).
COMPAT_INDEX_NAME = "cocatk"
#: Longest embedding a client may send (the widest open_clip towers are 1,280; the index checks the exact dim).
MAX_EMBEDDING_DIM = 4096

BM = TypeVar("BM", bound=BaseModel)

#: An indexed file's id in a path (``/api/thumb/{file_id}``): a row id, so 0 ... 2^63-1.
FileId = Annotated[int, PathParam(ge=0, le=MAX_ID, description="An id returned by a search (a row id)")]


class ApiError(Exception):
    """An HTTP error in the API's one shape: ``{"error": message, "hint": what to do}``."""

    def __init__(self, status: int, message: str, hint: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.hint, self.headers = status, message, hint, headers


def error_response(status: int, message: str, hint: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "hint": hint}, status_code=status, headers=headers)


class ErrorBody(BaseModel):
    """Every error the API answers: what went wrong, and what to do about it."""

    model_config = ConfigDict(extra="forbid")

    error: str = Field(description="What went wrong, one line")
    hint: str = Field(description="What to do about it")


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


#: The error statuses of the data endpoints, declared on their routers (a 500 is a bug and is not declared).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("The request is well formed but cannot be answered: an image that does not decode, a query "
                "embedding of the wrong size, an image_url to fetch"),
    401: _error("The server was started with --token and the request does not carry it"),
    404: _error("No such indexed file, folder or index name, or the indexed file is gone from disk"),
    409: _error("The index (or the chosen folder) holds no images yet"),
    413: _error("The request is larger than the upload limit (--max-upload-mb)"),
    422: _error("The request does not match this document: a missing or out-of-range parameter, bad JSON"),
    410: _error("The index folder was removed, or replaced by another index, while the server ran: restart it"),
    503: _error("The index is busy (a writer holds it); retry"),
}  # fmt: skip


# ---- the clip-retrieval requests ---------------------------------------------------------------------------------
def _json_int(value: Any) -> Any:
    """An integer as JSON Schema has it: 770 and 770.0, never true or "770" (the models are strict otherwise)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_AS_JSON_INT = BeforeValidator(_json_int)  # after the Field, so that its bounds reach the JSON schema
Id = Annotated[int, Field(ge=-MAX_ID, le=MAX_ID), _AS_JSON_INT]
Hits = Annotated[int, Field(ge=1, le=MAX_N), _AS_JSON_INT]
Finite = Annotated[float, Field(allow_inf_nan=False)]
#: The query fields of /knn-service, one of which must be given (text wins over image over embedding_input).
_QUERY_FIELDS: dict[str, dict[str, Any]] = {
    "text": {"type": "string", "minLength": 1},
    "image": {"type": "string", "minLength": 1},
    "embedding_input": {"type": "array", "minItems": 1},
    "image_url": {"type": "string", "minLength": 1},
}


def _one_query_required(schema: dict[str, Any]) -> None:
    schema["anyOf"] = [{"required": [name], "properties": {name: rule}} for name, rule in _QUERY_FIELDS.items()]


class KnnRequest(BaseModel):
    """clip-retrieval's ``/knn-service`` body (clip_back.py 2.45), plus cocatk's optional ``rerank``/``rerank_k``.

    One of ``text``, ``image``, ``embedding_input`` or ``image_url`` is required. Accepted and ignored (no such model
    here): ``use_mclip``, ``deduplicate``, ``use_safety_model``, ``use_violence_detector``, ``aesthetic_score``,
    ``aesthetic_weight``.
    """

    # strict: a JSON true is not the number 1, nor "5" the number 5 (what the schema says, the server holds)
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=_one_query_required)

    text: str | None = Field(None, max_length=2000)
    image: str | None = Field(None, description="the image file, base64")
    image_url: str | None = Field(
        None, max_length=2000, description="only this server's own /api/image/{id} (more like it): nothing is fetched"
    )
    embedding_input: list[Finite] | None = Field(
        None, max_length=MAX_EMBEDDING_DIM, description="a query embedding of the index's dimension"
    )
    modality: Literal["image"] = Field("image", description='the index holds image embeddings only: "image"')
    num_images: Hits = 40
    num_result_ids: Annotated[int, Field(ge=1, le=100_000), _AS_JSON_INT] | None = None
    indice_name: str | None = None
    use_mclip: bool = False
    deduplicate: bool = False
    use_safety_model: bool = False
    use_violence_detector: bool = False
    aesthetic_score: Annotated[int, _AS_JSON_INT] | str | None = ""
    aesthetic_weight: float | str | None = ""
    rerank: bool = Field(True, description="cocatk: rerank text queries by caption likelihood (as `cocatk search`)")
    rerank_k: Hits = Field(50, description="cocatk: candidates for the rerank")

    @model_validator(mode="after")
    def _has_query(self) -> KnnRequest:
        if not (self.text or self.image or self.embedding_input or self.image_url):
            raise ValueError('no query: send "text", "image" (base64), "embedding_input" or "image_url"')
        return self


class MetadataRequest(BaseModel):
    """clip-retrieval's ``/metadata`` body: the ids of earlier hits."""

    model_config = ConfigDict(extra="ignore", strict=True)

    ids: list[Id] = Field(default_factory=list, max_length=100_000)
    indice_name: str | None = None


def check_indice(name: str | None) -> None:
    """``indice_name`` names the one index, or nothing; another name is an index that is not here (404)."""
    if name is not None and name != COMPAT_INDEX_NAME:
        raise ApiError(404, f"unknown indice_name {name!r}", f'use "{COMPAT_INDEX_NAME}" (GET /indices-list)')


def json_body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for an endpoint that parses its JSON body itself (see :func:`read_json_body`)."""
    return {"requestBody": {"content": {"application/json": {"schema": model.model_json_schema()}}, "required": True}}


async def read_json_body(request: Request, model: type[BM]) -> BM:
    """The body as JSON whatever its Content-Type: clip front posts ``fetch(url, {body: JSON.stringify(...)})``,
    which browsers send as text/plain (and so without a CORS preflight). No body is a 422, as the schema says."""
    from pydantic import ValidationError

    raw = await request.body()
    if not raw.strip():
        raise ApiError(422, "the request has no body", "send a JSON object (see /docs for its shape)")
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())) or "body"
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        raise ApiError(422, f"{where}: {msg}", "see /docs for the request shape") from e


def own_image_id(url: str, request: Request) -> int | None:
    """The id in a url of this server's own ``/api/image/{id}`` (absolute on this host, or relative), else None."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.netloc and parts.netloc != request.url.netloc:
        return None
    head, _, tail = parts.path.rpartition("/")
    if head != "/api/image" or not (tail.isascii() and tail.isdigit()) or int(tail) > MAX_ID:
        return None
    return int(tail)


def _too_large(shown_mb: float) -> ApiError:
    return ApiError(413, f"the image is larger than the upload limit ({shown_mb:g} MB)",
                    "send a smaller image, or restart the server with a larger --max-upload-mb")  # fmt: skip


async def read_upload(file: UploadFile, limit: int, shown_mb: float) -> bytes:
    """The uploaded file's bytes: 413 above ``limit``, 400 when empty."""
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise _too_large(shown_mb)
    if not data:
        raise ApiError(400, "the uploaded file is empty", "send the bytes of an image file as `file`")
    return data


def decode_b64_image(text: str, limit: int, shown_mb: float) -> bytes:
    """The bytes of a base64 image (a ``data:`` URL too): 413 above ``limit``, 400 when not base64 or empty."""
    if len(text) > (limit + 2) // 3 * 4 + 4:
        raise _too_large(shown_mb)
    try:
        data = base64.b64decode(text.split(",", 1)[-1] if text.startswith("data:") else text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "image is not valid base64", 'send the image file base64-encoded as "image"') from e
    if not data:
        raise ApiError(400, "the image is empty", 'send the image file base64-encoded as "image"')
    return data
