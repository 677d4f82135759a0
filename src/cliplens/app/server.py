"""HTTP for :mod:`cliplens.app.core` (Starlette; served by uvicorn).

Routes: ``GET /`` the page; ``GET /api/scenes/{seed}`` a demo scene's prompts and
``.../image.png`` its picture; ``POST /api/run`` a form (multipart) -> a run id; ``GET
/api/jobs/{id}`` its progress; ``GET /api/jobs/{id}/view?mode=`` its results as HTML;
``GET /api/jobs/{id}/download`` the zip; ``GET /files/{id}/...`` the pictures a run wrote.
The evaluation panel: ``POST /api/evals`` (n, methods, metrics) -> an evaluation id; ``GET
/api/evals/{id}`` its progress; ``GET /api/evals/{id}/view`` its latest table as HTML; ``POST
/api/evals/{id}/cancel``; ``GET /api/evals/{id}/files/{name}`` its charts and reports.
A user error is HTTP 400 with ``{"error": one line}``; nothing else reaches the browser.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import sys

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..errors import CliplensError, InputError
from .core import Limits, Service, _int, scene, scene_prompts
from .page import index_html

log = logging.getLogger("cliplens.app")
_FIELD_BYTES = 64 * 1024  # a form field other than the image (the prompts are far below)


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def create_app(service: Service) -> Starlette:
    """The app over a :class:`Service`; the service's folder is removed at shutdown."""
    limits = service.limits

    async def index(request: Request) -> Response:
        return HTMLResponse(index_html(service))

    async def scene_info(request: Request) -> Response:
        seed = _int(request.path_params["seed"], "scene number", lo=0, hi=limits.max_scene_seed)
        sc = scene(seed)
        return JSONResponse({"seed": seed, "labels": sc.labels, "prompts": scene_prompts(sc)})

    async def scene_image(request: Request) -> Response:
        seed = _int(request.path_params["seed"], "scene number", lo=0, hi=limits.max_scene_seed)
        buf = io.BytesIO()
        scene(seed).image.save(buf, "PNG")
        return Response(buf.getvalue(), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    async def run(request: Request) -> Response:
        # the stated length bounds what is read (the server refuses a body longer than it says);
        # without one a chunked upload would be spooled to disk whole before any check
        size = request.headers.get("content-length", "")
        if not size.isdigit():
            return _error("the form must be sent with a Content-Length (a browser always sends one)")
        if int(size) > limits.max_upload_bytes + _FIELD_BYTES:
            return _error(f"the upload is too large; at most {limits.max_upload_bytes} bytes are allowed")
        try:
            form = await request.form(max_files=1, max_fields=40, max_part_size=_FIELD_BYTES)
        except Exception as exc:  # noqa: BLE001  (malformed multipart, a field above its size)
            detail = getattr(exc, "detail", None) or exc.__class__.__name__
            return _error(f"cannot read the form: {detail}")
        try:
            fields: dict[str, object] = {}
            upload = None
            for key, value in form.multi_items():
                if hasattr(value, "read"):  # the one file field
                    if key == "image" and getattr(value, "filename", ""):
                        upload = await value.read(limits.max_upload_bytes + 1)
                    continue
                if key == "methods":
                    fields.setdefault("methods", []).append(value)  # type: ignore[union-attr]
                else:
                    fields[key] = value
        finally:
            await form.close()
        job = await _in_thread(service.submit, fields, upload)
        return JSONResponse(job.progress())

    async def progress(request: Request) -> Response:
        return JSONResponse(service.job(request.path_params["job"]).progress())

    async def view(request: Request) -> Response:
        job = service.job(request.path_params["job"])
        mode = request.query_params.get("mode", "minmax")
        return HTMLResponse(await _in_thread(service.render, job, mode))

    async def download(request: Request) -> Response:
        job = service.job(request.path_params["job"])
        path = await _in_thread(service.zip, job)
        return FileResponse(path, media_type="application/zip", filename=f"cliplens-{job.id}.zip")

    async def files(request: Request) -> Response:
        parts = request.path_params["path"].split("/")
        return FileResponse(service.file(request.path_params["job"], parts))

    async def eval_start(request: Request) -> Response:
        size = request.headers.get("content-length", "")
        if not size.isdigit() or int(size) > _FIELD_BYTES:
            return _error("the evaluation form must be small and sent with a Content-Length")
        try:
            form = await request.form(max_files=0, max_fields=60, max_part_size=_FIELD_BYTES)
        except Exception as exc:  # noqa: BLE001
            detail = getattr(exc, "detail", None) or exc.__class__.__name__
            return _error(f"cannot read the form: {detail}")
        fields: dict[str, object] = {}
        for key, value in form.multi_items():
            if key in ("methods", "metrics"):
                fields.setdefault(key, []).append(value)  # type: ignore[union-attr]
            else:
                fields[key] = value
        job = await _in_thread(service.evals.start, fields)
        return JSONResponse(job.progress())

    async def eval_progress(request: Request) -> Response:
        return JSONResponse(service.evals.job(request.path_params["eval"]).progress())

    async def eval_view(request: Request) -> Response:
        return HTMLResponse(service.evals.render(service.evals.job(request.path_params["eval"])))

    async def eval_cancel(request: Request) -> Response:
        return JSONResponse(service.evals.cancel(request.path_params["eval"]).progress())

    async def eval_file(request: Request) -> Response:
        path = service.evals.file(request.path_params["eval"], request.path_params["name"])
        return FileResponse(path)

    async def user_error(request: Request, exc: Exception) -> Response:
        status = 404 if request.url.path.startswith("/files/") else 400
        return _error(str(exc), status)

    async def bug(request: Request, exc: Exception) -> Response:
        log.error("request %s failed", request.url.path, exc_info=exc)
        return _error("internal error (the server log has the details)", 500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            service.close()

    routes = [
        Route("/", index),
        Route("/api/scenes/{seed}", scene_info),
        Route("/api/scenes/{seed}/image.png", scene_image),
        Route("/api/run", run, methods=["POST"]),
        Route("/api/jobs/{job}", progress),
        Route("/api/jobs/{job}/view", view),
        Route("/api/jobs/{job}/download", download),
        Route("/files/{job}/{path:path}", files),
        Route("/api/evals", eval_start, methods=["POST"]),
        Route("/api/evals/{eval}", eval_progress),
        Route("/api/evals/{eval}/view", eval_view),
        Route("/api/evals/{eval}/cancel", eval_cancel, methods=["POST"]),
        Route("/api/evals/{eval}/files/{name}", eval_file),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={CliplensError: user_error, Exception: bug},
        lifespan=lifespan,
    )


async def _in_thread(fn, *args):
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def serve(model: str = "shapes", *, host: str = "127.0.0.1", port: int = 8765, device=None) -> None:
    """Load the model once and serve the app until interrupted; the temporary folder goes with it."""
    import uvicorn

    from ..adapters import load_model

    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"cliplens: warning: serving on {host}: anyone who can reach this machine can use the app "
            "and the model; there is no login",
            file=sys.stderr,
        )
    adapter = load_model(model, device=device)
    service = Service(adapter, Limits())
    atexit.register(service.close)
    print(f"cliplens app: model {adapter.name} on http://{host}:{port}/  (Ctrl-C stops it)", flush=True)
    try:
        uvicorn.run(create_app(service), host=host, port=port, log_level="warning")
    except OSError as exc:
        raise InputError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    finally:
        service.close()
