"""C-FIND: one SELECT in the index (index/query.py), one Pending response per match.

Matches are encoded by hand (identifiers.AnswerEncoder) and leave in batches of ~64 KB; a
C-CANCEL is honoured between matches; more than `query.max_results` matches end with 0xA700.
"""

from __future__ import annotations

import logging
import time

from pydicom.dataset import Dataset

from pacs_node.dimse.identifiers import AnswerEncoder, request_charset, request_keys
from pacs_node.dimse.qr_request import QRRequest, Replies
from pacs_node.dimse.qr_service import QueryRetrieveService
from pacs_node.dimse.status import (
    CANCEL,
    IDENTIFIER_DOES_NOT_MATCH,
    OUT_OF_RESOURCES,
    PENDING,
    SUCCESS,
)
from pacs_node.index import IndexFailure, QueryError
from pacs_node.index.query import FindRequest

log = logging.getLogger(__name__)


def serve_find(
    service: QueryRetrieveService,
    replies: Replies,
    request: QRRequest,
    model: str,
    level: str,
    identifier: Dataset,
    transfer_syntax: str,
) -> None:
    """Answer one C-FIND-RQ (its identifier decoded, its level checked)."""
    started = time.monotonic()
    try:
        matches = service.find(_find_request(service, model, level, identifier))
    except QueryError as e:
        replies.refuse(request, "find", model, level, IDENTIFIER_DOES_NOT_MATCH, str(e))
        return
    except IndexFailure as e:
        replies.refuse(request, "find", model, level, OUT_OF_RESOURCES, f"index: {e}")
        return
    status, sent = _send_matches(
        service, replies, request, level, identifier, transfer_syntax, matches
    )
    elapsed_ms = (time.monotonic() - started) * 1000
    log.info(
        "event=find calling_ae=%s model=%s level=%s matches=%d status=0x%04X ms=%.1f",
        replies.channel.calling_ae,
        model,
        level,
        sent,
        status,
        elapsed_ms,
    )
    replies.record(
        "find", model=model, level=level, matches=sent, status=status, ms=round(elapsed_ms, 1)
    )


def _find_request(
    service: QueryRetrieveService, model: str, level: str, identifier: Dataset
) -> FindRequest:
    """The index request for an identifier: its keys, the name matching, the limit."""
    settings = service.config.query
    return FindRequest(
        model=model,
        level=level,
        keys=request_keys(identifier),
        case_insensitive_names=settings.case_insensitive_names,
        limit=settings.max_results,
    )


def _send_matches(
    service: QueryRetrieveService,
    replies: Replies,
    request: QRRequest,
    level: str,
    identifier: Dataset,
    transfer_syntax: str,
    matches: list[dict[str, str]],
) -> tuple[int, int]:
    """Pending per match, then the final response; (final status, matches sent)."""
    limit = service.config.query.max_results
    capped = bool(limit) and len(matches) > limit
    if capped:
        matches = matches[:limit]
    charset = request_charset(identifier)
    encoder = AnswerEncoder(identifier, level, service.config.dicom.ae_title, transfer_syntax)
    pending = replies.response(request, PENDING, has_dataset=True)  # the same for each
    sent = 0
    status, comment = SUCCESS, None
    replies.writer.hold()  # matches leave in batches of ~64 KB; cancel is checked per match
    try:
        for match in matches:
            if request.cancelled.is_set():
                status = CANCEL
                break
            encoded = encoder.encode(match, [charset, match.get("SpecificCharacterSet", "")])
            replies.writer.small_message(request.context_id, pending, encoded)
            sent += 1
        else:
            if capped:
                status = OUT_OF_RESOURCES
                comment = f"more than {limit} matches: refine the query"
        replies.final(request, status, comment)
    finally:
        replies.writer.flush()
    return status, sent
