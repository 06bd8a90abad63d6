"""The FastAPI application of `cocatk serve`: JSON API, clip-retrieval compatible endpoints, thumbnails, the page.

A thin edge (STYLE rule 11): every endpoint parses, calls a library function (``search_index``, ``Index.info``,
``indexed_folders``, ``load_image``) in a worker thread, and renders JSON. Errors are one shape,
``{"error": ..., "hint": ...}`` with a 4xx; a 500 (same shape) means a bug.

Concurrency. One :class:`~cocatk.retrieval.index.Index` (one SQLite connection, one FAISS index, one model) serves
every request, and every call into it holds one lock. Why not one ``Index`` per worker thread: each would hold its
own copy of the FAISS vectors (N x D float32 per thread, 40 threads by default) and rebuild it on every new
generation; and the model, the expensive part, is one object shared by all of them anyway (``load_model`` caches
it), whose forward passes already use every core (CPU) or serialise on the GPU. So parallel searches would not
finish sooner, and the lock makes the shared ``Store`` (not thread-safe) and the ``vectors`` reload on a new
generation safe. Work that needs no index (decoding and resizing thumbnails, sending files) runs outside the lock.

New generations. Nothing here caches vectors or paths: each search reads ``index.vectors``, which reloads when a
``cocatk index`` run beside the server has committed a new generation; the folder list is cached per generation.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import mimetypes
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import config
from ..errors import CocatkError, EmptyIndexError, ImageError, IndexBusyError, IndexNotFoundError, UsageError
from ..paths import json_path, text_path
from ..sources import source_bytes, source_exists, source_name
from .schemas import (
    COMPAT_INDEX_NAME,
    ERROR_RESPONSES,
    MAX_N,
    THUMB_MAX,
    THUMB_MIN,
    ApiError,
    FileId,
    KnnRequest,
    MetadataRequest,
    check_indice,
    decode_b64_image,
    error_response,
    json_body_schema,
    own_image_id,
    read_json_body,
    read_upload,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..retrieval.index import Index
    from ..retrieval.search import SearchResult

T = TypeVar("T")

STATIC_DIR = Path(__file__).parent / "static"
TOKEN_COOKIE = "cocatk_token"
_NO_STORE = {"Cache-Control": "no-store"}


@dataclass
class ServeSettings:
    """What `cocatk serve` passes to :func:`create_app`. ``token`` None: no authentication (local bind only)."""

    index_dir: str | os.PathLike[str] | None = None
    model: str | None = None
    pretrained: str | None = None
    device: str | None = None
    token: str | None = None
    cors_origin: str | None = None
    max_upload_mb: float = 20.0

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def _status_of(e: CocatkError) -> int:
    if isinstance(e, EmptyIndexError):
        return 409  # the request is fine; the index (or the chosen folder) holds nothing yet
    if isinstance(e, (UsageError, ImageError)):
        return 400
    if isinstance(e, IndexNotFoundError):
        return 404
    if isinstance(e, IndexBusyError):
        return 503
    return 500


# ---- the backend: one index, one lock ----------------------------------------------------------------------------
class Backend:
    """The open index and everything requests share. Every use of ``index`` goes through :meth:`call`."""

    def __init__(self, index: Index, settings: ServeSettings) -> None:
        self.index = index
        self.settings = settings
        self.lock = threading.Lock()
        self._folders: tuple[int, list[tuple[str, int, bool]]] | None = None
        key = hashlib.sha256(os.fsencode(str(index.dir))).hexdigest()[:16]
        self.thumb_dir = config.cache_dir() / "thumbs" / key

    @classmethod
    def open(cls, settings: ServeSettings) -> Backend:
        """Open the index and load its model and vectors (start-up: before the first request, not during it)."""
        from ..retrieval.index import Index

        index = Index.open(settings.index_dir, model=settings.model, pretrained=settings.pretrained,
                           device=settings.device)  # fmt: skip
        try:
            if index.is_empty:
                raise EmptyIndexError(
                    f"the index at {index.dir} holds no images", hint=f"run `cocatk index PATH --index {index.dir}`"
                )
            index.model  # noqa: B018 - load the model now
            index.vectors  # noqa: B018 - and the FAISS index
        except BaseException:
            index.close()
            raise
        return cls(index, settings)

    def close(self) -> None:
        with self.lock:
            self.index.close()

    def call(self, fn: Callable[[Index], T]) -> T:
        """Run ``fn(index)`` holding the index lock (in a worker thread: the caller uses run_in_threadpool).
        A 410 once the index folder is gone from disk: answers from memory would be about files nobody has."""
        with self.lock:
            gone = self.index.missing_from_disk()
            if gone is not None:
                raise ApiError(
                    410,
                    gone,
                    f"restore the folder, or build the index again (`cocatk index PATH --index {self.index.dir}`), "
                    "then restart `cocatk serve`",
                )
            return fn(self.index)

    async def run(self, fn: Callable[[Index], T]) -> T:
        return await run_in_threadpool(self.call, fn)

    # ---- lookups ---------------------------------------------------------------------------------------------
    def folders(self, index: Index) -> list[tuple[str, int, bool]]:
        """:func:`indexed_folders`, cached per generation (call with the lock held)."""
        from ..retrieval.search import indexed_folders

        gen = index.store.generation
        if self._folders is None or self._folders[0] != gen:
            self._folders = (gen, indexed_folders(index))
        return self._folders[1]

    def resolve_under(self, index: Index, under: str | None) -> str | None:
        """The stored folder named by the client's ``under`` text; only a root or a folder of indexed files."""
        if under is None or under == "":
            return None
        want = under.rstrip("/") or "/"
        for folder, _, _ in self.folders(index):
            if text_path(folder) == want:
                return folder
        raise ApiError(
            404,
            f"under={under!r} is not a folder of the index",
            "pass one of the folders that /api/folders lists (a root or a folder holding indexed images)",
        )

    def file_of(self, index: Index, file_id: int) -> tuple[Any, str]:
        """(source, content hash) of indexed image ``file_id``: its file's path, or an item's place in its shard
        (:meth:`IndexFolder.item_sources`); 404 for an id that is not in the index."""
        source = index.item_sources([file_id])[0]
        if source is None:
            raise ApiError(404, f"id {file_id} is not in the index", "use ids returned by a search")
        return source, index.store.hashes_for_ids([file_id])[0] or ""

    def max_megapixels(self, index: Index) -> float | None:
        from ..images import DEFAULT_MAX_MEGAPIXELS

        return index.manifest.get("max_megapixels", DEFAULT_MAX_MEGAPIXELS)


def _gone(source: Any) -> ApiError:
    return ApiError(
        404,
        f"the indexed file {text_path(source_name(source))} is gone from disk",
        "run `cocatk index` to refresh the index (it drops deleted files)",
    )


def _media_of(key: str, data: bytes) -> str:
    """The media type of an item's image bytes, as PIL identifies them (an item has no file name to go by)."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            media = Image.MIME.get(im.format or "", "application/octet-stream")
    except (UnidentifiedImageError, OSError):
        media = "application/octet-stream"
    return media if media.startswith("image/") and media != "image/svg+xml" else "application/octet-stream"


def make_thumbnail(source: Any, target: Path, size: int, max_megapixels: float | None) -> None:
    """Write a JPEG thumbnail (longest side ``size``, EXIF orientation applied) atomically: temp file, rename.
    ``source``: a file's path, or an item's place in its shard."""
    from PIL import Image

    from ..images import load_image

    im = load_image(source if isinstance(source, str) else source_bytes(source), draft_size=size,
                    max_megapixels=max_megapixels)  # fmt: skip
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        im.save(tmp, "JPEG", quality=85, optimize=True)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


# ---- request limits and authentication ---------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: refuse a request body above ``limit`` bytes with 413, counted while it arrives.

    ``Content-Length`` above the limit is refused before reading; a chunked body is counted chunk by chunk and the
    request is cut off at the limit (the multipart parser would otherwise spool any size to disk first).
    """

    def __init__(self, app: Any, limit: int, shown_mb: float) -> None:
        self.app, self.limit, self.shown_mb = app, limit, shown_mb

    def _response(self) -> JSONResponse:
        return error_response(
            413,
            f"the request is larger than the upload limit ({self.shown_mb:g} MB)",
            "send a smaller image, or restart the server with a larger --max-upload-mb",
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._response()(scope, receive, send)
            return
        seen = 0
        over = False

        async def counting_receive() -> dict[str, Any]:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise _TooLarge()
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if over:  # whatever the app made of the cut-off body, the answer is 413
                return
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _TooLarge:
            pass
        except Exception:
            if not over:
                raise
        if over:
            await self._response()(scope, receive, send)


class _TooLarge(Exception):
    pass


def _supplied_token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)


def require_token(request: Request) -> None:
    """With ``--token``: the request must carry it (Authorization: Bearer, ?token=, or the cocatk_token cookie)."""
    token = request.app.state.settings.token
    if token is None:
        return
    supplied = _supplied_token(request)
    if supplied is None or not hmac.compare_digest(supplied.encode(), token.encode()):
        raise ApiError(
            401,
            "missing or wrong token" if supplied else "this server needs a token",
            "send `Authorization: Bearer TOKEN`, a `token` query parameter or a `cocatk_token` cookie "
            "(the token `cocatk serve --token` was started with)",
            headers={"WWW-Authenticate": "Bearer"},
        )


# ---- rendering ---------------------------------------------------------------------------------------------------
def render_search(result: SearchResult) -> dict[str, Any]:
    """``cocatk search --json``'s document, plus each hit's ``thumb_url`` and ``image_url``."""
    doc = result.to_dict()
    for hit in doc["hits"]:
        hit["thumb_url"] = f"/api/thumb/{hit['id']}"
        hit["image_url"] = f"/api/image/{hit['id']}"
    return doc


def _json_info(info: dict[str, Any]) -> dict[str, Any]:
    """``Index.info()`` with every path as JSON-safe text (failures already carry path_b64 when needed)."""
    out = dict(info)
    out["index_dir"] = text_path(info["index_dir"])
    out["roots"] = [json_path(r) for r in info["roots"]]
    return out


# ---- the application ---------------------------------------------------------------------------------------------
def create_app(settings: ServeSettings) -> FastAPI:
    """The `cocatk serve` application. The index and its model open in the lifespan (start-up), once.

    Raises (at start-up): IndexNotFoundError, EmptyIndexError, model errors.
    """
    from starlette.staticfiles import StaticFiles

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backend = await run_in_threadpool(Backend.open, settings)
        app.state.backend = backend
        try:
            yield
        finally:
            backend.close()

    app = FastAPI(
        title="cocatk",
        summary="CoCa image search over a cocatk index",
        lifespan=lifespan,
        # The page and the docs hold no data: they load without the token; every data endpoint requires it.
    )
    app.state.settings = settings
    _install_error_handlers(app)

    api = APIRouter(prefix="/api", dependencies=[Depends(require_token)], responses=ERROR_RESPONSES)
    compat = APIRouter(dependencies=[Depends(require_token)], tags=["clip-retrieval"], responses=ERROR_RESPONSES)

    def backend_of(request: Request) -> Backend:
        return request.app.state.backend

    # ---- JSON API -----------------------------------------------------------------------------------------------
    @api.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        """Liveness, image count, index generation and model."""
        b = backend_of(request)

        def facts(index: Index) -> dict[str, Any]:
            return {
                "status": "ok",
                "images": index.ntotal,
                "generation": index.store.generation,
                "model": index.model.info(),
            }

        return await b.run(facts)

    @api.get("/info")
    async def info(request: Request) -> dict[str, Any]:
        """``cocatk info --json``: manifest, counts, roots, size on disk, failures."""
        return _json_info(await backend_of(request).run(lambda index: index.info()))

    @api.get("/folders")
    async def folders(request: Request) -> dict[str, Any]:
        """The roots and every folder that holds indexed images (from stored paths): the values ``under`` takes."""
        b = backend_of(request)
        rows = await b.run(b.folders)
        return {
            "roots": [json_path(f) for f, _, root in rows if root],
            "folders": [{**json_path(f), "files": count, "root": root} for f, count, root in rows],
        }

    @api.get("/search")
    async def search(
        request: Request,
        q: str = Query(..., min_length=1, max_length=2000, pattern=r"\S", description="What to look for (not blank)"),
        n: int = Query(10, ge=1, le=MAX_N),
        rerank: bool = True,
        rerank_k: int = Query(50, ge=1, le=MAX_N),
        not_: list[str] = Query([], alias="not", max_length=20, description="Subtract these texts (repeatable)"),
        under: str | None = Query(None, description="Only hits below this folder (one of /api/folders)"),
    ) -> dict[str, Any]:
        """Text search: ``cocatk search --json``'s document plus ``thumb_url``/``image_url`` per hit."""
        from ..retrieval.search import search_index

        b = backend_of(request)

        def go(index: Index) -> SearchResult:
            folder = b.resolve_under(index, under)
            return search_index(index, text=q, negative=tuple(not_), n=n, rerank=rerank, rerank_k=rerank_k,
                                under=folder)  # fmt: skip

        return render_search(await b.run(go))

    @api.post("/search/image")
    async def search_image(
        request: Request,
        file: UploadFile = File(..., description="The query image (JPEG, PNG, WebP, ...)"),
        q: str | None = Form(None, max_length=2000, description="Optional text, combined with the image"),
        n: int = Form(10, ge=1, le=MAX_N),
        rerank: bool = Form(True),
        rerank_k: int = Form(50, ge=1, le=MAX_N),
        not_: list[str] = Form([], alias="not"),
        under: str | None = Form(None),
    ) -> dict[str, Any]:
        """Search by an uploaded image (and optional text ``q``: the mean of both, reranked by the text)."""
        from ..retrieval.search import search_index

        b = backend_of(request)
        data = await read_upload(file, settings.max_upload_bytes, settings.max_upload_mb)
        text = q if q and q.strip() else None

        def go(index: Index) -> SearchResult:
            folder = b.resolve_under(index, under)
            return search_index(index, text=text, image=data, negative=tuple(not_), n=n, rerank=rerank,
                                rerank_k=rerank_k, under=folder)  # fmt: skip

        return render_search(await b.run(go))

    @api.get("/similar/{file_id}")
    async def similar(
        request: Request,
        file_id: FileId,
        n: int = Query(10, ge=1, le=MAX_N),
        under: str | None = Query(None),
    ) -> dict[str, Any]:
        """ "More like this": the file's stored embedding as the query; the file itself is not among the hits."""
        from ..retrieval.search import search_index

        b = backend_of(request)

        def go(index: Index) -> SearchResult:
            b.file_of(index, file_id)  # 404 for an id that is not in the index
            return search_index(index, like_id=file_id, n=n, under=b.resolve_under(index, under))

        return render_search(await b.run(go))

    @api.get("/thumb/{file_id}", response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    async def thumb(request: Request, file_id: FileId, size: int = Query(256, ge=THUMB_MIN, le=THUMB_MAX)) -> Response:
        """A JPEG thumbnail (longest side ``size``, EXIF orientation applied), cached on disk by content hash."""
        b = backend_of(request)
        path, content_hash, max_mp = await b.run(lambda ix: (*b.file_of(ix, file_id), b.max_megapixels(ix)))
        target = b.thumb_dir / f"{file_id}-{content_hash[:16]}-{size}.jpg"
        if not target.is_file():
            if not source_exists(path):
                raise _gone(path)
            try:  # outside the index lock: decoding and resizing need no index
                await run_in_threadpool(make_thumbnail, path, target, size, max_mp)
            except ImageError as e:
                reason = getattr(e, "reason", None) or e.message
                raise ApiError(
                    404, f"the indexed file {text_path(path)} cannot be read: {reason}", "run `cocatk index`"
                ) from e
        return FileResponse(target, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @api.get("/image/{file_id}", response_class=Response, responses={200: {"content": {"image/*": {}}}})
    async def image(request: Request, file_id: FileId) -> Response:
        """The original file of an indexed image, with its media type."""
        b = backend_of(request)
        path, _ = await b.run(lambda ix: b.file_of(ix, file_id))
        if not (os.path.isfile(path) if isinstance(path, str) else source_exists(path)):
            raise _gone(path)
        name = source_name(path)
        media = mimetypes.guess_type(os.fsencode(name).decode("latin-1"))[0] or "application/octet-stream"
        if not media.startswith("image/") or media == "image/svg+xml":
            media = "application/octet-stream"  # never let a browser run an indexed file as a document
        if not isinstance(path, str):  # an item of a shard: its bytes, read from their place in the shard
            try:
                data = await run_in_threadpool(source_bytes, path)
            except OSError as e:
                raise _gone(path) from e
            media = _media_of(path.key, data)
            headers = {"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}
            return Response(data, media_type=media, headers=headers)
        return FileResponse(
            path,
            media_type=media,
            headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
        )

    # ---- clip-retrieval compatible endpoints (clip_back.py) -----------------------------------------------------
    @compat.get("/indices-list")
    async def indices_list() -> list[str]:
        """clip-retrieval: the index names (one: ``cocatk``)."""
        return [COMPAT_INDEX_NAME]

    @compat.post("/knn-service", openapi_extra=json_body_schema(KnnRequest))
    async def knn_service(request: Request) -> list[dict[str, Any]]:
        """clip-retrieval's knn query: ``[{"id", "similarity", "url", "caption", "image_path", ...}]``.

        ``text`` wins over ``image`` (base64) over ``embedding_input``, as in clip_back. Text queries are reranked
        by caption likelihood unless ``"rerank": false``. ``image_url`` is refused (no network access).
        """
        from ..retrieval.search import search_index

        body = await read_json_body(request, KnnRequest)
        b = backend_of(request)
        check_indice(body.indice_name)
        # The schema requires one query field (empty ones count as absent): text, else image, else image_url, else
        # embedding_input.
        text = body.text or None
        data: bytes | None = None
        like_id: int | None = None
        embedding: list[float] | None = None
        if text is None and body.image:
            data = decode_b64_image(body.image, settings.max_upload_bytes, settings.max_upload_mb)
        elif text is None and body.image_url:
            # clip front's click-to-search sends a hit's own url back: this server's /api/image/{id}, answered as
            # "more like this" from the stored embedding. Any other url is refused: nothing is fetched.
            like_id = own_image_id(body.image_url, request)
            if like_id is None:
                raise ApiError(
                    400,
                    "image_url is not supported: the server fetches nothing from the network",
                    'send the image file itself, base64-encoded, as "image"',
                )
        elif text is None:
            embedding = body.embedding_input
        n = min(body.num_images, body.num_result_ids or body.num_images)

        def go(index: Index) -> SearchResult:
            return search_index(index, text=text, image=data, embedding=embedding, like_id=like_id, n=n,
                                rerank=body.rerank, rerank_k=body.rerank_k)  # fmt: skip

        base = str(request.base_url).rstrip("/")

        def go_rows(index: Index) -> list[dict[str, Any]]:
            result = go(index)
            rows = _compat_rows(index, base, [h.id for h in result.hits], [h.path for h in result.hits])
            for row, hit in zip(rows, result.hits, strict=True):
                row.update({"id": hit.id, "similarity": hit.similarity, "loglik": hit.loglik})
            return rows

        return await b.run(go_rows)

    @compat.post("/metadata", openapi_extra=json_body_schema(MetadataRequest))
    async def metadata(request: Request) -> list[dict[str, Any]]:
        """clip-retrieval: ``[{"id", "metadata": {"url", "caption", "image_path"}}]``; {} for an unknown id."""
        body = await read_json_body(request, MetadataRequest)
        b = backend_of(request)
        check_indice(body.indice_name)
        if not body.ids:
            return []
        base = str(request.base_url).rstrip("/")

        def rows(index: Index) -> list[dict[str, Any]]:
            paths = index.store.paths_for_ids(body.ids)
            held_ids = [i for i, p in zip(body.ids, paths, strict=True) if p is not None]
            held_paths = [p for p in paths if p is not None]
            found = dict(zip(held_ids, _compat_rows(index, base, held_ids, held_paths), strict=True))
            return [{"id": i, "metadata": found.get(i, {})} for i in body.ids]

        return await b.run(rows)

    app.include_router(api)
    app.include_router(compat)

    # ---- the page (no data in it: loads without the token) -----------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        index_html = STATIC_DIR / "index.html"
        if index_html.is_file():
            return FileResponse(index_html, media_type="text/html", headers=_NO_STORE)
        return JSONResponse({"cocatk": "serve", "docs": "/docs"})

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    if settings.cors_origin:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=[settings.cors_origin],
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    # Multipart framing and base64 (4/3) around an image of max_upload_mb, plus 1 MiB of form fields.
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes * 4 // 3 + 2**20, shown_mb=settings.max_upload_mb)
    return app


def _compat_rows(index: Index, base: str, ids: list[int], paths: list[str]) -> list[dict[str, Any]]:
    """clip-retrieval's metadata of each row (call with the index lock held). clip front shows ``caption`` under
    each image (cut to ~50 characters): the image's caption where the index has one (a dataset item's own, else the
    latest generated one), else the file name; the full path (``shard#key`` for an item) is ``image_path``. ``url``
    is this server's copy of the image, which clip front displays; a dataset item's own url (its JSON field) is
    ``source_url``, beside the JSON field's other scalar values (width, height, ...)."""
    captions = index.store.captions_for_ids(ids)
    metas = index.item_meta(ids)
    out = []
    for i, path in zip(ids, paths, strict=True):
        shown = text_path(path)
        row: dict[str, Any] = {}
        for k, v in (metas.get(i) or {}).items():
            if isinstance(v, (str, int, float, bool)) and k not in ("id", "similarity", "loglik"):
                row["source_url" if k == "url" else k] = v
        row.update(url=f"{base}/api/image/{i}", caption=captions.get(i) or os.path.basename(shown) or shown,
                   image_path=shown)  # fmt: skip
        out.append(row)
    return out


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.hint, e.headers)

    @app.exception_handler(CocatkError)
    async def _cocatk(request: Request, e: CocatkError) -> JSONResponse:
        return error_response(_status_of(e), e.message, e.hint)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors()[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body", "path", "form"))
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return error_response(422, "; ".join(parts) or "invalid request", "see /docs for the accepted parameters")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        hint = {404: "see /docs for the endpoints", 405: "see /docs for the methods each endpoint takes"}
        return error_response(e.status_code, str(e.detail), hint.get(e.status_code, "see /docs"), e.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:  # pragma: no cover - a bug, not bad input
        return error_response(
            500, f"internal error ({type(e).__name__})", "this is a bug in cocatk; the server log has the traceback"
        )


__all__ = ["ApiError", "Backend", "ServeSettings", "create_app", "render_search"]
