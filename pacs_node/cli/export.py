"""`pacs-node export`: the command line of a de-identified research export (the export itself
is `pacs_node/export/`).

Exit codes as every command: 0 done, 1 runtime failure (destination or index unreachable, an
instance that could not be exported: run the same command again to resume), 2 bad
configuration, profile or usage.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from pacs_node.cli.errors import BadInput, Failure
from pacs_node.cli.options import ConfigSource, config_source_options, setup_tool_logging
from pacs_node.config import Config
from pacs_node.export.deidentify import Keyring
from pacs_node.export.profile import Profile, ProfileError, load_profile
from pacs_node.export.run import (
    LINK_MODES,
    DestinationRefused,
    ExportError,
    ExportReport,
    ExportRequest,
    derive_export_id,
    run_export,
)
from pacs_node.export.select import Selection, SelectionError
from pacs_node.export.state import StateError
from pacs_node.keys import GENERATE_HINT, local_id_secret, weak_key_reason
from pacs_node.progress import ProgressBar
from pacs_node.storage.export_target import (
    MAX_PRESIGN_S,
    ExportTargetError,
    S3Options,
    open_target,
)

KEY_ENV = "PACS_NODE_PSEUDONYM_KEY"
log = logging.getLogger(__name__)
_DURATION_RE = re.compile(r"^(\d+)([smhd]?)$")


@contextmanager
def _decoder_warnings_to_debug_log() -> Iterator[None]:
    """pydicom warns about odd values it meets while decoding (an unknown character set, an
    invalid value), on stderr and in its WARNING log, once per value: a long export would
    bury its progress and report under them, and they may quote patient data. They go to the
    log at DEBUG instead, with their count at INFO."""
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.ERROR)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            pydicom_log.setLevel(level)
    for w in caught:
        log.debug(
            "event=export_decoder_warning category=%s message=%s", w.category.__name__, w.message
        )
    if caught:
        log.info("event=export_decoder_warnings count=%d (DEBUG logging shows them)", len(caught))


def _duration_s(text: str) -> int:
    match = _DURATION_RE.match(text.strip())
    if not match:
        raise click.BadParameter("a number of seconds, or with s, m, h or d (e.g. 7d)")
    seconds = int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    if not 1 <= seconds <= MAX_PRESIGN_S:
        raise click.BadParameter(f"between 1 s and 7 days ({MAX_PRESIGN_S} s)")
    return seconds


def _pseudonym_key() -> bytes:
    value = os.environ.get(KEY_ENV, "")
    weak = weak_key_reason(value.encode()) if value else None
    if weak is not None:
        raise BadInput(
            f"configuration error: {KEY_ENV} is {weak}, e.g. from `openssl rand -base64 32`; "
            f"a weak key lets pseudonyms be reversed by guessing ({GENERATE_HINT})"
        )
    if not value:
        raise BadInput(
            f"configuration error: set {KEY_ENV} to the project's secret key (at least 16 "
            "characters, e.g. from `openssl rand -base64 32`); it is never stored, and the "
            "same key gives the same pseudonyms in every export of the project"
        )
    return value.encode()


def _summarize_profile(profile: Profile) -> None:
    counts = Counter(r.action for r in profile.rules.values())
    counts.update(r.action for _, r in profile.patterns)
    click.echo(f"profile OK: {profile.name} v{profile.version} ({profile.source})")
    click.echo(f"  sha256: {profile.sha256}")
    click.echo(f"  options: {', '.join(profile.options) or '(Basic Profile only)'}")
    click.echo("  actions: " + ", ".join(f"{a} {n}" for a, n in sorted(counts.items())))
    click.echo(
        f"  age bands: {list(profile.age_bands)}; date shift: {profile.shift_min_days}.."
        f"{profile.shift_max_days} days; private kept: {len(profile.private_keep)}; "
        f"burned-in exported: {profile.export_burned_in}; mapping: {profile.mapping}"
    )
    for rule in profile.deviations:
        click.echo(f"  DEVIATION {rule.tag} {rule.name}: {rule.action} ({rule.deviation})")


@click.command("export", context_settings={"help_option_names": ["-h", "--help"]})
@config_source_options
@click.option("--all", "select_all", is_flag=True, help="Select every instance.")
@click.option("--study-uid", "study_uids", multiple=True, help="A Study Instance UID (repeatable).")
@click.option("--patient-id", help="Patient ID (C-FIND matching: * and ? wildcards).")
@click.option("--accession", help="Accession Number (C-FIND matching).")
@click.option("--modality", help="Only the series of this modality (e.g. CT).")
@click.option("--date-range", help="Study date or range: 20240101-20240131, 20240101-, ...")
@click.option(
    "--to",
    "destination",
    help="Destination: s3://bucket/prefix or a directory (never the clinical bucket).",
)
@click.option(
    "--profile",
    "profile_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="De-identification profile (TOML; default: the shipped research profile).",
)
@click.option(
    "--export-id",
    help="Name of the export (default: derived from selection, destination, profile and key,"
    " so running the same command again resumes it).",
)
@click.option(
    "--links",
    type=click.Choice(LINK_MODES),
    default="key",
    show_default=True,
    help="What the manifest's link column holds: the key, a presigned URL, or a public URL.",
)
@click.option(
    "--link-expiry",
    default="7d",
    show_default=True,
    help="How long presigned links stay valid (seconds, or 30m, 12h, 7d; at most 7d).",
)
@click.option("--aws-profile", help="Named AWS profile for the export bucket.")
@click.option("--endpoint-url", help="S3-compatible endpoint of the export bucket.")
@click.option(
    "--allow-plain-http",
    is_flag=True,
    help="Allow an http:// --endpoint-url (no TLS: data in transit unprotected; test endpoints).",
)
@click.option("--region", help="Region of the export bucket.")
@click.option(
    "--addressing-style",
    type=click.Choice(("auto", "path", "virtual")),
    default="auto",
    show_default=True,
)
@click.option("--purpose", help="Why this export is made (ethics approval, request id).")
@click.option("--dry-run", is_flag=True, help="Only count what would be exported.")
@click.option("--check-profile", is_flag=True, help="Validate the profile, summarize it, and exit.")
def export_command(
    config_source: ConfigSource,
    select_all: bool,
    study_uids: tuple[str, ...],
    patient_id: str | None,
    accession: str | None,
    modality: str | None,
    date_range: str | None,
    destination: str | None,
    profile_path: Path | None,
    export_id: str | None,
    links: str,
    link_expiry: str,
    aws_profile: str | None,
    endpoint_url: str | None,
    allow_plain_http: bool,
    region: str | None,
    addressing_style: str,
    purpose: str | None,
    dry_run: bool,
    check_profile: bool,
) -> None:
    """Export de-identified studies (DICOM PS3.15 Annex E) to a research bucket or directory.

    Selects like C-FIND, de-identifies each instance with the profile, writes it with a
    manifest (CSV and JSON Lines) and a README, and records the export in the audit. The
    pseudonym key comes from PACS_NODE_PSEUDONYM_KEY. Interrupted? Run the same command
    again: it continues where it stopped.
    """
    try:
        profile = load_profile(profile_path)
    except ProfileError as e:
        raise BadInput(f"profile error: {e}") from e
    if check_profile:
        _summarize_profile(profile)
        return
    config = config_source.load()
    setup_tool_logging(config)
    selection = Selection(
        all=select_all,
        study_uids=tuple(u.strip() for u in study_uids),
        patient_id=patient_id,
        accession_number=accession,
        modality=modality,
        date_range=date_range,
    )
    try:
        selection.validate()
    except SelectionError as e:
        raise BadInput(f"usage error: {e}") from e
    if dry_run:
        _dry_run(config, selection)
        return
    if not destination:
        raise BadInput("usage error: --to DIR_OR_S3_URL is required")
    try:
        expiry_s = _duration_s(link_expiry)
    except click.BadParameter as e:
        raise BadInput(f"usage error: --link-expiry: {e.message}") from e
    key = _pseudonym_key()
    if endpoint_url and endpoint_url.lower().startswith("http://") and not allow_plain_http:
        raise BadInput(
            f"usage error: --endpoint-url {endpoint_url} is plain HTTP: de-identified data would "
            "cross the network unencrypted; use https://, or --allow-plain-http for a test "
            "endpoint"
        )
    try:
        target = open_target(
            destination,
            S3Options(
                profile=aws_profile,
                endpoint_url=endpoint_url,
                region=region,
                addressing_style=addressing_style,
            ),
        )
    except ExportTargetError as e:
        raise BadInput(f"usage error: --to: {e}") from e
    request = ExportRequest(
        selection=selection,
        destination=destination,
        target=target,
        profile=profile,
        keyring=Keyring(key, local_id_secret(config.data_dir)),
        pseudonym_key=key,
        export_id=export_id,
        links=links,
        link_expiry_s=expiry_s,
        purpose=purpose,
    )
    request.export_id = request.export_id or derive_export_id(request)
    try:
        with _decoder_warnings_to_debug_log():
            report = run_export(config, request, progress=ProgressBar())
    except (StateError, SelectionError, DestinationRefused) as e:
        raise BadInput(f"usage error: {e}") from e
    except ExportError as e:
        raise Failure(
            f"error: {e}\nexport {request.export_id} stopped; run the same command again to "
            "resume it"
        ) from e
    except OSError as e:
        raise Failure(f"error: {e}; run the same command again to resume") from e
    _print_report(report, target.description)
    if not report.complete:
        raise Failure()


def _dry_run(config: Config, selection: Selection) -> None:
    from pacs_node.export.run import _select

    try:
        items = _select(config, selection)
    except (ExportError, SelectionError) as e:
        raise Failure(f"error: {e}") from e
    studies = {i.study_uid for i in items}
    series = {i.series_uid for i in items}
    evicted = sum(1 for i in items if i.cache_path is None)
    click.echo(
        f"would export {len(items)} instances ({sum(i.file_size for i in items)} bytes) in "
        f"{len(series)} series, {len(studies)} studies; {evicted} to be read from the bucket"
    )


def _print_report(report: ExportReport, where: str) -> None:
    for reason, sops in report.skipped.items():
        for sop in sops[:100]:
            click.echo(f"skipped ({reason.replace('_', ' ')}): {sop}")
    for sop in report.unavailable[:100]:
        click.echo(f"UNAVAILABLE (no readable copy; retried on the next run): {sop}")
    for sop, why in report.failed[:100]:
        click.echo(f"FAILED: {sop}: {why}")
    skipped = sum(len(v) for v in report.skipped.values())
    click.echo(
        f"export {report.export_id} -> {where} ({report.root_key}): "
        f"{report.instances} instances in the manifest ({report.bytes} bytes); "
        f"this run exported {report.exported}, {report.already_done} were already done"
        f"{' (resumed)' if report.resumed else ''}; skipped {skipped}, "
        f"unavailable {len(report.unavailable)}, failed {len(report.failed)}"
    )
    for key in report.manifest_keys:
        click.echo(f"  {key}")
    if not report.complete:
        click.echo("incomplete: run the same command again to retry what is missing")
