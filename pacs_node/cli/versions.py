"""`pacs-node versions list | show | resolve`: the SOP instances received more than once with
different bytes, reviewed and resolved by an operator (the domain code is `pacs_node/versions.py`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from pacs_node.cli.errors import BadInput, Failure
from pacs_node.cli.options import config_options
from pacs_node.cli.output import iso
from pacs_node.config import Config
from pacs_node.index import Index, IndexFailure
from pacs_node.index.versions import VersionDetail, VersionsError
from pacs_node.parts import build_audit, build_cache, open_existing_index
from pacs_node.versions import differences, list_versions, resolve, served_version, versions_of


@contextmanager
def _index(config: Config) -> Iterator[Index]:
    index = open_existing_index(config)
    if index is None:
        raise Failure("index: not created yet (no instance received): no versions to review")
    try:
        yield index
    except VersionsError as e:
        raise Failure(f"error: {e}") from e
    except IndexFailure as e:
        raise Failure(f"error: {e}") from e
    finally:
        index.close()


def _state(v: VersionDetail) -> str:
    if v.replicated:
        return "replicated"
    return "replication pending" if v.job_state == "pending" else "not replicated"


def _as_json(v: VersionDetail, served: int | None) -> dict[str, Any]:
    return {
        "sop_instance_uid": v.sop_uid,
        "version": v.version,
        "study_instance_uid": v.study_uid,
        "series_instance_uid": v.series_uid,
        "sop_class_uid": v.sop_class_uid,
        "transfer_syntax_uid": v.transfer_syntax_uid,
        "size": v.file_size,
        "sha256": v.sha256,
        "received_at": iso(v.received_at),
        "calling_ae": v.calling_ae,
        "peer_address": v.peer_address,
        "cached": v.cache_path is not None,
        "replicated": v.replicated,
        "replicated_at": iso(v.replicated_at),
        "needs_review": v.needs_review,
        "served": v.version == served,
        "served_by_choice": v.served,
    }


def _grouped(versions: list[VersionDetail]) -> dict[str, list[VersionDetail]]:
    groups: dict[str, list[VersionDetail]] = {}
    for v in versions:
        groups.setdefault(v.sop_uid, []).append(v)
    return groups


def _version_line(v: VersionDetail, served: int | None) -> str:
    marks = []
    if v.version == served:
        marks.append("SERVED" + (" (chosen)" if v.served else ""))
    if v.needs_review:
        marks.append("NEEDS REVIEW")
    return (
        f"  v{v.version}  {v.file_size} B  sha256 {v.sha256[:16]}  "
        f"received {iso(v.received_at) or '-'} from {v.calling_ae} ({v.peer_address})  "
        f"{_state(v)}, {'cached' if v.cache_path is not None else 'not cached'}"
        + (f"  [{', '.join(marks)}]" if marks else "")
    )


@click.group("versions")
def versions_group() -> None:
    """Review instances received again with different bytes (both kept as versions).

    `list` names them (UIDs, sizes, hashes, senders; no patient data), `show` compares one
    instance's versions, `resolve` records the operator's decision. Nothing is deleted unless
    asked explicitly (resolve --keep N --delete-others), and never a copy not yet verified in
    the bucket.
    """


@versions_group.command("list")
@config_options
@click.option("--pending", is_flag=True, help="Only instances with a version pending review.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_command(config: Config, pending: bool, as_json: bool) -> None:
    """Every SOP instance held in more than one version or pending review."""
    serve_version = config.duplicates.serve_version
    if not config.index.path.exists():
        click.echo("[]" if as_json else "index: not created yet (no instance received)")
        return
    with _index(config) as index:
        groups = _grouped(list_versions(index, pending_only=pending))
    if as_json:
        out = [_as_json(v, served_version(vs, serve_version)) for vs in groups.values() for v in vs]
        click.echo(json.dumps(out, indent=2))
        return
    pending_count = sum(any(v.needs_review for v in vs) for vs in groups.values())
    click.echo(
        f"{len(groups)} SOP instance(s) with several versions or pending review "
        f"({pending_count} pending review; retrieval serves the "
        f"{serve_version!r} version unless one was chosen)"
    )
    for sop_uid, vs in groups.items():
        served = served_version(vs, serve_version)
        click.echo(f"{sop_uid}  study {vs[0].study_uid}  series {vs[0].series_uid}")
        for v in vs:
            click.echo(_version_line(v, served))


@versions_group.command("show")
@config_options
@click.argument("sop_uid")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show_command(config: Config, sop_uid: str, as_json: bool) -> None:
    """Each version of SOP_UID and the header attributes that differ between them.

    The differing values may include patient data (names, IDs): they are printed at this
    explicit request only, never logged.
    """
    serve_version = config.duplicates.serve_version
    with _index(config) as index:
        vs = versions_of(index, sop_uid)
    found, missing = differences(build_cache(config), vs)
    served = served_version(vs, serve_version)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "versions": [_as_json(v, served) for v in vs],
                    "differences": [
                        {"keyword": d.keyword, "tag": d.tag, "values": d.values} for d in found
                    ],
                    "not_compared": missing,
                },
                indent=2,
            )
        )
        return
    click.echo(f"{sop_uid}: {len(vs)} version(s)")
    for v in vs:
        click.echo(_version_line(v, served))
        click.echo(f"      transfer syntax {v.transfer_syntax_uid}  sha256 {v.sha256}")
    if served is None:
        click.echo("served: none (version 1 is not held, so C-FIND and retrieval do not see it)")
    if missing:
        click.echo(
            "not compared (not in the cache; in the bucket): " + ", ".join(f"v{n}" for n in missing)
        )
    if len(vs) - len(missing) < 2:
        return
    if not found:
        click.echo("header attributes: identical (the bytes differ in the pixel data or after it)")
        return
    click.echo("attributes that differ:")
    for d in found:
        values = "  ".join(f"v{n}={value}" for n, value in d.values.items())
        click.echo(f"  {d.keyword} {d.tag}: {values}")


@versions_group.command("resolve")
@config_options
@click.argument("sop_uid")
@click.option("--keep-both", is_flag=True, help="Keep every version; retrieval as before.")
@click.option(
    "--serve", "serve", type=int, metavar="VERSION", help="Keep every version; serve VERSION."
)
@click.option(
    "--keep",
    "keep",
    type=int,
    metavar="VERSION",
    help="Keep VERSION as the instance (served); the others stay unless --delete-others.",
)
@click.option(
    "--delete-others",
    is_flag=True,
    help="With --keep: remove the other versions' cached bytes, each only if its bucket copy "
    "is verified (the bucket copy and the index row stay). Asks for confirmation.",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (--delete-others).")
def resolve_command(
    config: Config,
    sop_uid: str,
    keep_both: bool,
    serve: int | None,
    keep: int | None,
    delete_others: bool,
    yes: bool,
) -> None:
    """Record the decision on SOP_UID's versions and clear its review flag (audited).

    --keep-both: every version stays, retrieval serves what it served.
    --serve VERSION: every version stays, retrieval serves VERSION (overrides
    duplicates.serve_version for this instance).
    --keep VERSION: VERSION is the instance from now on (served); the others stay, unless
    --delete-others, which removes their cached bytes, only where the bucket copy is verified.
    """
    chosen = [
        name
        for name, given in (
            ("--keep-both", keep_both),
            ("--serve", serve is not None),
            ("--keep", keep is not None),
        )
        if given
    ]
    if len(chosen) != 1:
        raise BadInput("error: give exactly one of --keep-both, --serve VERSION, --keep VERSION")
    if delete_others and keep is None:
        raise BadInput("error: --delete-others goes only with --keep VERSION")
    action = "keep-both" if keep_both else ("serve" if serve is not None else "keep")
    version = serve if serve is not None else keep
    if delete_others and not yes:
        click.confirm(
            f"Remove the cached bytes of every version of {sop_uid} but v{keep} "
            "(only those whose bucket copy is verified; the bucket copies stay)?",
            abort=True,
        )
    audit = build_audit(config)
    try:
        audit.open()
    except OSError as e:
        raise Failure(f"error: the audit record cannot be written ({e}): nothing resolved") from e
    try:
        with _index(config) as index:
            result = resolve(
                index,
                audit,
                build_cache(config),
                sop_uid,
                action,
                version=version,
                delete_others=delete_others,
            )
    finally:
        audit.close()
    if action == "keep-both":
        click.echo(f"{sop_uid}: versions {_names(result.versions)} kept; review cleared")
    else:
        click.echo(
            f"{sop_uid}: v{version} is served from now on; versions "
            f"{_names(result.versions)} kept; review cleared"
        )
    if result.removed_cached:
        click.echo(
            f"cached bytes removed (verified in the bucket, which keeps them): "
            f"{_names(result.removed_cached)}"
        )


def _names(versions: tuple[int, ...]) -> str:
    return ", ".join(f"v{n}" for n in versions) or "-"
