"""The status page and the study browser: server-rendered HTML, no script, no build step,
readable on a phone (one column below 40em). Read-only; every value is HTML-escaped."""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from typing import TYPE_CHECKING
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse

from pacs_node import __version__
from pacs_node.index.query import FindRequest

if TYPE_CHECKING:
    from pacs_node.web.app import WebApp

_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;padding:1em;max-width:70em;color:#222}
nav a{margin-right:1em} h1,td,p{overflow-wrap:anywhere} table{border-collapse:collapse;width:100%}
td,th{border-bottom:1px solid #ddd;padding:.3em .5em;text-align:left}
.alert{background:#fdd;border:1px solid #c00;padding:.5em;margin:.5em 0}
.series{display:inline-block;width:10em;margin:.5em;vertical-align:top}
.series img{width:128px;height:128px;object-fit:contain;background:#000}
form input,form button{font-size:1em;margin:.2em 0}
@media (max-width:40em){td:nth-child(n+5),th:nth-child(n+5){display:none}
.series{width:45%}}
"""


def redirect_home(request: Request) -> RedirectResponse:
    return RedirectResponse("/ui/status")


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)} - pacs-node</title><style>{_STYLE}</style></head><body>"
        '<nav><a href="/ui/status">Status</a><a href="/ui/studies">Studies</a></nav>'
        f"<h1>{escape(title)}</h1>{body}"
        f"<footer><small>pacs-node {escape(__version__)}</small></footer></body></html>"
    )


def _age(then: datetime | None) -> str:
    if then is None:
        return "-"
    seconds = (datetime.now(UTC).replace(tzinfo=None) - then).total_seconds()
    return f"{seconds:.0f} s"


def _find(
    app: WebApp, level: str, keys: dict[str, str], *, names_any_case: bool = False, limit: int = 0
) -> list[dict[str, str]]:
    """C-FIND's matching (Study Root), as QIDO-RS uses it; `keys`: matching and return keys."""
    request = FindRequest(
        model="STUDY", level=level, keys=keys, case_insensitive_names=names_any_case, limit=limit
    )
    return app.index.find(request)


def status_page(app: WebApp, request: Request) -> str:
    counts = app.index.status()
    replication = app.index.replication_counts()
    alerts = []
    if not app.replication_on:
        alerts.append("Replication is off: no off-site copy of any instance exists.")
    if replication.failing:
        alerts.append(
            f"{replication.failing} replication job(s) failing; last error: "
            f"{replication.last_error or '-'}"
        )
    if counts.versions_pending_review:
        alerts.append(f"{counts.versions_pending_review} instance version(s) pending review")
    rows = [
        ("Patients", counts.patients),
        ("Studies", counts.studies),
        ("Series", counts.series),
        ("Instances", counts.instances),
        ("Cache use", f"{app.cache.budget.used / 1024**2:.1f} MiB"),
        ("Last received", counts.last_received_at or "-"),
        ("Replication pending", replication.pending),
        ("Oldest pending age", _age(replication.oldest_pending_received_at)),
        ("Replicated in the last minute", replication.replicated_last_minute),
    ]
    body = "".join(f'<div class="alert" role="alert">{escape(a)}</div>' for a in alerts)
    body += (
        "<table id=status>"
        + "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in rows)
        + "</table>"
    )
    return _page("Status", body)


def studies_page(app: WebApp, request: Request) -> str:
    q = request.query_params
    patient, date, modality = q.get("patient", ""), q.get("date", ""), q.get("modality", "")
    keys = {
        "PatientName": "",
        "PatientID": "",
        "StudyDate": date.replace("-", ""),
        "StudyDescription": "",
        "ModalitiesInStudy": modality.upper(),
        "NumberOfStudyRelatedInstances": "",
    }
    if patient:
        keys["PatientName"] = f"*{patient}*"
    matches = _find(app, "STUDY", keys, names_any_case=True, limit=200)[:200]
    form = (
        '<form method=get action="/ui/studies">'
        f'<input name=patient placeholder="Patient name" value="{escape(patient)}"> '
        f'<input name=date placeholder="Date (YYYYMMDD or range A-B)" value="{escape(date)}"> '
        f'<input name=modality placeholder="Modality" value="{escape(modality)}"> '
        "<button type=submit>Search</button></form>"
    )
    rows = "".join(
        "<tr class=study>"
        f'<td><a href="/ui/studies/{quote(m["StudyInstanceUID"])}">'
        f"{escape(m['PatientName'] or '(no name)')}</a></td>"
        f"<td>{escape(m['PatientID'])}</td><td>{escape(m['StudyDate'])}</td>"
        f"<td>{escape(m['ModalitiesInStudy'])}</td><td>{escape(m['StudyDescription'])}</td>"
        f"<td>{escape(m['NumberOfStudyRelatedInstances'])}</td></tr>"
        for m in matches
    )
    table = (
        "<table id=studies><tr><th>Patient</th><th>ID</th><th>Date</th><th>Modalities</th>"
        f"<th>Description</th><th>Instances</th></tr>{rows}</table>"
    )
    return _page("Studies", form + f"<p>{len(matches)} studies</p>" + table)


def study_page(app: WebApp, request: Request) -> str:
    study_uid = request.path_params["study"]
    series_keys = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription")
    series = _find(
        app,
        "SERIES",
        {"StudyInstanceUID": study_uid, "NumberOfSeriesRelatedInstances": ""}
        | dict.fromkeys(series_keys, ""),
    )
    study_keys = ("PatientName", "PatientID", "StudyDate", "StudyDescription")
    found = _find(app, "STUDY", {"StudyInstanceUID": study_uid} | dict.fromkeys(study_keys, ""))
    if not found:
        return _page("No such study", f"<p>{escape(study_uid)}</p>")
    st = found[0]
    base = f"/dicom-web/studies/{quote(study_uid)}"
    cards = "".join(
        "<div class=series>"
        f'<img alt="series {escape(s["SeriesNumber"])}" loading=lazy '
        f'src="{base}/series/{quote(s["SeriesInstanceUID"])}/thumbnail">'
        f"<div>#{escape(s['SeriesNumber'])} {escape(s['Modality'])} "
        f"{escape(s['SeriesDescription'])}</div>"
        f"<div>{escape(s['NumberOfSeriesRelatedInstances'])} instances</div></div>"
        for s in series
    )
    links = f"<p><small>{escape(study_uid)}</small></p><p>"
    if app.config.web.viewer_url:
        viewer = app.config.web.viewer_url.replace("{study}", quote(study_uid))
        links += f'<a id=viewer href="{escape(viewer)}">Open in the viewer</a> '
    links += f'<a href="{base}/metadata">Metadata (DICOM JSON)</a></p>'
    title = f"{st['PatientName'] or '(no name)'} {st['StudyDate']} {st['StudyDescription']}"
    return _page(title, links + f"<div id=series>{cards}</div>")
