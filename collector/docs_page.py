"""``/docs``, the API's Swagger UI page, served without the internet.

FastAPI's own ``/docs`` page loads Swagger UI's script and style from a CDN, so on a hub with no
internet it is blank. The collector's extra installs ``fastapi-swagger``, a wheel that carries
Swagger UI's built files (we use only those files, not its patching); the page is FastAPI's own
HTML pointed at them, served under ``/docs/assets``. Where that wheel is missing, FastAPI's
default page stays in place (:func:`swagger_assets` is None).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

__all__ = ["DOCS", "DOCS_ASSETS", "serve_docs", "swagger_assets"]

DOCS = "/docs"
DOCS_ASSETS = "/docs/assets"
_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")


def swagger_assets() -> Path | None:
    """The folder holding Swagger UI's files, or None when ``fastapi-swagger`` is missing."""
    try:
        folder = Path(str(resources.files("fastapi_swagger.resources")))
    except (ImportError, TypeError):
        return None
    return folder if all((folder / name).is_file() for name in _FILES) else None


def serve_docs(app: FastAPI, assets: Path) -> None:
    """Add ``/docs``, its OAuth2 redirect page and ``/docs/assets`` to ``app`` (created with
    ``docs_url=None``). Plain routes, not API routes: they are not in the OpenAPI document."""
    redirect = DOCS + "/oauth2-redirect"
    title = f"{app.title} - API"

    async def page(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + (app.openapi_url or "/openapi.json"),
            title=title,
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon-32x32.png",
            oauth2_redirect_url=root + redirect,
        )

    async def oauth2_redirect(request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    app.add_route(DOCS, page, include_in_schema=False)
    app.add_route(redirect, oauth2_redirect, include_in_schema=False)
    app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="swagger-ui")
