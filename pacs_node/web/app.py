"""The Starlette application: routes, access checks, audit, errors -> HTTP statuses.

Endpoints are plain functions (Starlette runs them, and iterates streamed bodies, in its
thread pool), so the index, the cache and ingest are called as from a DIMSE thread. Every
request is audited (`find` / `retrieve` / `store` as for DIMSE, with `via=dicomweb`, the
token's name and the peer) and logged PHI-free: method, route template, status, never a query
string or a patient attribute.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pacs_node.audit import AuditLog
from pacs_node.config import Config
from pacs_node.index import Index, IndexFailure, QueryError
from pacs_node.index.records import RetrieveItem
from pacs_node.ingest import Ingest, Sender
from pacs_node.retrieve.readback import MISMATCH, Readback, ReadbackFailed
from pacs_node.storage.cache import Cache
from pacs_node.storage.layout import InvalidUID, validate_uid
from pacs_node.storage.target import ReplicationTarget
from pacs_node.web import pages, render
from pacs_node.web.access import Caller, Refused, authenticate, require
from pacs_node.web.dicomjson import match_json, tag_hex
from pacs_node.web.qido import BadQuery, build_query
from pacs_node.web.stow import BadUpload, StowUpload
from pacs_node.web.wado import (
    Multipart,
    NotAcceptable,
    coalesced,
    instance_parts,
    metadata,
    requested_syntax,
    served_syntax,
    split_header,
)

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
# path parameter -> the audit record's field (UIDs go into the audit, never into the log)
_PATH_UIDS = {
    "study": "study_instance_uid",
    "series": "series_instance_uid",
    "instance": "sop_instance_uid",
}
PREFIX = "/dicom-web"


class DicomJSONResponse(JSONResponse):
    media_type = DICOM_JSON

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _problem(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class WebApp:
    def __init__(
        self,
        config: Config,
        index: Index,
        cache: Cache,
        target: ReplicationTarget | None,
        ingest: Ingest,
        audit: AuditLog,
    ) -> None:
        self.config = config
        self.index = index
        self.cache = cache
        self.ingest = ingest
        self.audit = audit
        self.readback = Readback(cache, index, target, config.replication.prefix, audit)
        self.replication_on = target is not None

    # -- the ASGI app -----------------------------------------------------------------------------

    def asgi(self) -> Starlette:
        p = PREFIX
        study = "/studies/{study}"
        series = study + "/series/{series}"
        instance = series + "/instances/{instance}"
        routes = [
            Route("/", pages.redirect_home),
            Route("/ui/status", self._page(pages.status_page)),
            Route("/ui/studies", self._page(pages.studies_page)),
            Route("/ui/studies/{study}", self._page(pages.study_page)),
            Route(p + "/studies", self._qido("STUDY"), methods=["GET"]),
            Route(p + "/studies", self._stow, methods=["POST"]),
            Route(p + "/series", self._qido("SERIES")),
            Route(p + "/instances", self._qido("IMAGE")),
            Route(p + study + "/series", self._qido("SERIES")),
            Route(p + study + "/instances", self._qido("IMAGE")),
            Route(p + series + "/instances", self._qido("IMAGE")),
            Route(p + study, self._retrieve("STUDY")),
            Route(p + series, self._retrieve("SERIES")),
            Route(p + instance, self._retrieve("IMAGE")),
            Route(p + study + "/metadata", self._metadata("STUDY")),
            Route(p + series + "/metadata", self._metadata("SERIES")),
            Route(p + instance + "/metadata", self._metadata("IMAGE")),
            Route(p + instance + "/rendered", self._rendered(thumbnail=False)),
            Route(p + instance + "/thumbnail", self._rendered(thumbnail=True)),
            Route(p + series + "/thumbnail", self._rendered(thumbnail=True, series=True)),
            Route(p + instance + "/frames/{frames}/rendered", self._rendered(thumbnail=False)),
            Route(p + instance + "/frames/{frames}", self._frames()),
            Route(p + instance + "/bulkdata/{tag}", self._bulkdata()),
        ]
        middleware = []
        if self.config.web.cors_origins:
            middleware.append(
                Middleware(
                    CORSMiddleware,
                    allow_origins=list(self.config.web.cors_origins),
                    allow_methods=["GET", "POST", "OPTIONS"],
                    allow_headers=["Authorization", "Accept", "Content-Type"],
                    expose_headers=["Content-Type", "Warning"],
                    max_age=600,
                )
            )
        return Starlette(routes=routes, middleware=middleware)

    # -- common -----------------------------------------------------------------------------------

    def _caller(self, request: Request, permission: str) -> Caller:
        caller = authenticate(self.config.web, request.headers.get("authorization"))
        require(caller, permission)
        return caller

    def _base(self, request: Request) -> str:
        """The DICOMweb root URL for the URLs in answers."""
        root = self.config.web.public_url or str(request.base_url).rstrip("/")
        return root + PREFIX

    def _peer(self, request: Request) -> str:
        client = request.client
        return f"{client.host}:{client.port}" if client else "-"

    def _audit(self, request: Request, event: str, caller: str, **fields: object) -> None:
        self.audit.record_quietly(
            event, via="dicomweb", client=caller, peer=self._peer(request), **fields
        )

    def _guard(
        self, permission: str, event: str, handler: Callable[[Request, Caller], Response]
    ) -> Callable[[Request], Response]:
        """Authentication, UID validation, error mapping, log and audit around a handler."""

        def endpoint(request: Request) -> Response:
            started = time.monotonic()
            caller_name = "-"
            try:
                caller = self._caller(request, permission)  # before anything else is said
                caller_name = caller.name
                for name, value in request.path_params.items():
                    if name in _PATH_UIDS:
                        validate_uid(value, name)
                response = handler(request, caller)
            except Refused as e:
                headers = {"WWW-Authenticate": 'Bearer realm="pacs-node"'}
                response = _problem(e.status, e.reason, headers if e.status == 401 else None)
                self._audit(
                    request,
                    "web_access_refused",
                    caller_name,
                    reason=e.reason,
                    status=e.status,
                    route=_route(request),
                )
            except InvalidUID as e:
                response = _problem(400, str(e))
            except (BadQuery, QueryError) as e:
                response = _problem(400, str(e))
            except NotAcceptable as e:
                response = _problem(406, str(e))
            except IndexFailure as e:
                response = _problem(503, f"index unavailable: {e}", {"Retry-After": "5"})
            except ReadbackFailed as e:
                response = _problem(500 if e.kind == MISMATCH else 503, e.reason)
            log.info(
                "event=web_request method=%s route=%s status=%d client=%s ms=%.1f",
                request.method,
                _route(request),
                response.status_code,
                caller_name,
                (time.monotonic() - started) * 1000,
            )
            if response.status_code < 400:
                uids = {_PATH_UIDS[k]: v for k, v in request.path_params.items() if k in _PATH_UIDS}
                self._audit(
                    request,
                    event,
                    caller_name,
                    route=_route(request),
                    status=response.status_code,
                    **uids,
                )
            return response

        return endpoint

    # -- QIDO-RS ----------------------------------------------------------------------------------

    def _qido(self, level: str) -> Callable[[Request], Response]:
        def handle(request: Request, caller: Caller) -> Response:
            fixed = {}
            if "study" in request.path_params:
                fixed["StudyInstanceUID"] = request.path_params["study"]
            if "series" in request.path_params:
                fixed["SeriesInstanceUID"] = request.path_params["series"]
            settings = self.config.query
            query = build_query(
                level,
                request.query_params.multi_items(),
                fixed,
                case_insensitive_names=settings.case_insensitive_names,
                max_results=settings.max_results,
            )
            matches = self.index.find(query.request)
            more = bool(query.limit) and len(matches) > query.offset + query.limit
            page = matches[query.offset : query.offset + query.limit if query.limit else None]
            base = self._base(request)
            answer = [
                match_json(m, {tag_hex("RetrieveURL"): _retrieve_url(base, m, level)}) for m in page
            ]
            headers = {}
            if more:
                headers["Warning"] = (
                    '299 pacs-node "There are additional results that can be requested"'
                )
            return DicomJSONResponse(answer, headers=headers)

        return self._guard("search", "find", handle)

    # -- WADO-RS ----------------------------------------------------------------------------------

    def _items(self, level: str, request: Request) -> list[RetrieveItem]:
        params = request.path_params
        uids = {"StudyInstanceUID": params["study"]}
        if "series" in params:
            uids["SeriesInstanceUID"] = params["series"]
        if "instance" in params:
            uids["SOPInstanceUID"] = params["instance"]
        return self.index.instances_to_retrieve(level, uids, self.config.duplicates.serve_version)

    def _retrieve(self, level: str) -> Callable[[Request], Response]:
        def handle(request: Request, caller: Caller) -> Response:
            requested = requested_syntax(request.headers.get("accept"))
            items = self._items(level, request)
            if not items:
                return _problem(404, "no such instances")
            syntaxes = [served_syntax(i.transfer_syntax_uid, requested) for i in items]
            multipart = Multipart()
            first = self.readback.open(items[0])  # verified before the status is sent
            return StreamingResponse(
                coalesced(
                    instance_parts(
                        self.readback,
                        items,
                        syntaxes,
                        multipart,
                        self.config.dicom.ae_title,
                        first,
                    )
                ),
                media_type=multipart.content_type,
                background=BackgroundTask(first.close),  # if the body was never iterated
            )

        return self._guard("retrieve", "retrieve", handle)

    def _metadata(self, level: str) -> Callable[[Request], Response]:
        def handle(request: Request, caller: Caller) -> Response:
            _accepts(request, DICOM_JSON)
            items = self._items(level, request)
            if not items:
                return _problem(404, "no such instances")
            base = self._base(request)
            answer = [
                metadata(
                    self.readback,
                    item,
                    f"{base}/studies/{item.study_uid}/series/{item.series_uid}"
                    f"/instances/{item.sop_uid}",
                )
                for item in items
            ]
            return DicomJSONResponse(answer)

        return self._guard("retrieve", "retrieve", handle)

    def _one(self, request: Request) -> RetrieveItem | None:
        items = self._items("IMAGE", request)
        return items[0] if items else None

    def _rendered(self, *, thumbnail: bool, series: bool = False) -> Callable[[Request], Response]:
        def handle(request: Request, caller: Caller) -> Response:
            if series:
                items = self._items("SERIES", request)
                item = items[len(items) // 2] if items else None
            else:
                item = self._one(request)
            if item is None:
                return _problem(404, "no such instance")
            frame = 1
            if "frames" in request.path_params:
                frame = render.frame_numbers(request.path_params["frames"])[0]
            media = render.media_type(request.headers.get("accept"), request.query_params)
            body = render.render(
                self.readback,
                item,
                frame,
                media,
                thumbnail=thumbnail,
                window=request.query_params.get("window"),
            )
            return Response(body, media_type=media)

        return self._guard("retrieve", "retrieve", handle)

    def _frames(self) -> Callable[[Request], Response]:
        def handle(request: Request, caller: Caller) -> Response:
            item = self._one(request)
            if item is None:
                return _problem(404, "no such instance")
            numbers = render.frame_numbers(request.path_params["frames"])
            multipart = Multipart()
            parts = render.frame_parts(self.readback, item, numbers, multipart)
            content_type = multipart.content_type.replace(
                'type="application/dicom"', f'type="{parts.media_type}"'
            )
            return Response(parts.body, media_type=content_type)

        return self._guard("retrieve", "retrieve", handle)

    def _bulkdata(self) -> Callable[[Request], Response]:
        def handle(request: Request, caller: Caller) -> Response:
            item = self._one(request)
            if item is None:
                return _problem(404, "no such instance")
            try:
                tag = int(request.path_params["tag"], 16)
            except ValueError:
                return _problem(400, "bulkdata/{tag}: 8 hex digits")
            multipart = Multipart()
            value = render.bulk_value(self.readback, item, tag)
            if value is None:
                return _problem(404, "no such bulk data element")
            body = (
                multipart.part_header("application/octet-stream", len(value))
                + value
                + b"\r\n"
                + multipart.close()
            )
            content_type = multipart.content_type.replace(
                'type="application/dicom"', 'type="application/octet-stream"'
            )
            return Response(body, media_type=content_type)

        return self._guard("retrieve", "retrieve", handle)

    # -- STOW-RS ----------------------------------------------------------------------------------

    async def _stow(self, request: Request) -> Response:
        started = time.monotonic()
        try:
            caller = authenticate(self.config.web, request.headers.get("authorization"))
            require(caller, "store")
        except Refused as e:
            self._audit(
                request,
                "web_access_refused",
                "-",
                reason=e.reason,
                status=e.status,
                route=_route(request),
            )
            return _problem(e.status, e.reason, {"WWW-Authenticate": 'Bearer realm="pacs-node"'})
        media = split_header(request.headers.get("content-type", ""))
        if (
            not media
            or media[0].type != "multipart/related"
            or media[0].params.get("type", "").lower() != "application/dicom"
            or not media[0].params.get("boundary")
        ):
            return _problem(
                415,
                'STOW-RS takes Content-Type: multipart/related; type="application/dicom"; '
                "boundary=...",
            )
        declared = request.headers.get("content-length")
        limit = self.config.web.max_request_bytes
        if declared and declared.isdigit() and int(declared) > limit:
            return _problem(413, f"the body exceeds web.max_request_bytes ({limit})")
        sender = Sender(caller.name, self._peer(request))
        upload = StowUpload(self.ingest, media[0].params["boundary"], sender)
        received = 0
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    await run_in_threadpool(upload.abandon, "body too large")
                    return _problem(413, f"the body exceeds web.max_request_bytes ({limit})")
                if chunk:
                    await run_in_threadpool(upload.write, chunk)
            await run_in_threadpool(upload.finish)
        except BadUpload as e:
            response: Response = _problem(400, str(e))
        except Exception as e:  # the client went away mid-body (ClientDisconnect) and the like
            await run_in_threadpool(upload.abandon, f"upload interrupted: {type(e).__name__}")
            log.warning("event=stow_interrupted error=%r", e)
            response = _problem(400, f"upload interrupted: {type(e).__name__}")
        else:
            base = self._base(request)
            response = DicomJSONResponse(
                stow_response(upload, base),
                status_code=_stow_status(upload),
            )
        self._audit(
            request,
            "store",
            caller.name,
            route=_route(request),
            status=response.status_code,
            stored=len(upload.stored),
            failed=len(upload.failed),
        )
        log.info(
            "event=web_request method=POST route=%s status=%d client=%s stored=%d failed=%d "
            "ms=%.1f",
            _route(request),
            response.status_code,
            caller.name,
            len(upload.stored),
            len(upload.failed),
            (time.monotonic() - started) * 1000,
        )
        return response

    # -- pages ------------------------------------------------------------------------------------

    def _page(self, render_page: Callable[[WebApp, Request], str]) -> Callable:
        """A page: needs `search` (it shows what QIDO-RS would)."""

        def handle(request: Request, caller: Caller) -> Response:
            return HTMLResponse(render_page(self, request))

        return self._guard("search", "find", handle)


def _stow_status(upload: StowUpload) -> int:
    if not upload.failed:
        return 200
    return 202 if upload.stored else 409


def stow_response(upload: StowUpload, base: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    referenced = []
    for result in upload.stored:
        item = {
            tag_hex("ReferencedSOPClassUID"): {
                "vr": "UI",
                "Value": [result.reception.sop_class_uid] if result.reception else [],
            },
            tag_hex("ReferencedSOPInstanceUID"): {"vr": "UI", "Value": [result.sop_uid]},
        }
        if result.new is not None:
            a = result.new.attributes
            item[tag_hex("RetrieveURL")] = {
                "vr": "UR",
                "Value": [
                    f"{base}/studies/{a.study_uid}/series/{a.series_uid}/instances/{a.sop_uid}"
                ],
            }
        referenced.append(item)
    failed = [
        {
            tag_hex("ReferencedSOPClassUID"): {"vr": "UI", "Value": [f.sop_class_uid]}
            if f.sop_class_uid
            else {"vr": "UI"},
            tag_hex("ReferencedSOPInstanceUID"): {"vr": "UI", "Value": [f.sop_uid]}
            if f.sop_uid
            else {"vr": "UI"},
            tag_hex("FailureReason"): {"vr": "US", "Value": [f.reason]},
            "00000902": {"vr": "LO", "Value": [f.comment[:64]]},  # ErrorComment: why
        }
        for f in upload.failed
    ]
    if referenced:
        out[tag_hex("ReferencedSOPSequence")] = {"vr": "SQ", "Value": referenced}
    if failed:
        out[tag_hex("FailedSOPSequence")] = {"vr": "SQ", "Value": failed}
    return out


def _accepts(request: Request, media_type: str) -> None:
    accept = request.headers.get("accept")
    if not accept:
        return
    for media in split_header(accept):
        if media.type in (media_type, "application/json", "*/*", "application/*"):
            return
    raise NotAcceptable(f"Accept {accept!r}: this resource is served as {media_type}")


def _retrieve_url(base: str, match: dict[str, str], level: str) -> dict[str, Any]:
    url = f"{base}/studies/{match.get('StudyInstanceUID', '')}"
    if level in ("SERIES", "IMAGE"):
        url += f"/series/{match.get('SeriesInstanceUID', '')}"
    if level == "IMAGE":
        url += f"/instances/{match.get('SOPInstanceUID', '')}"
    return {"vr": "UR", "Value": [url]}


def _route(request: Request) -> str:
    """The route template (no UID, no query string): PHI-free."""
    route = request.scope.get("route")
    return getattr(route, "path", "?")
