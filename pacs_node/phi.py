"""Keeping patient data out of the logs.

The node's own log lines and audit details name attributes and kinds of error, never values.
Libraries are another matter: pydicom warns (and logs) "Invalid value for VR DA: '19431207x'",
quoting the value it was given, which may be a birth date or a patient ID from a query.
`keep_values_out_of_logs()` replaces every quoted value in pydicom's log records with `<value>`
and silences the same text sent as a Python warning (to stderr, hence the journal).
"""

from __future__ import annotations

import logging
import re
import warnings

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|b'[^']*'")
REDACTED = "<value>"


class RedactQuotedValues(logging.Filter):
    """Rewrites a record's message with every quoted string replaced by `<value>`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep only the template
            message = str(record.msg)
        record.msg = _QUOTED.sub(REDACTED, message)
        record.args = None
        return True


def redact(text: str) -> str:
    return _QUOTED.sub(REDACTED, text)


def keep_values_out_of_logs() -> None:
    """Process-wide, idempotent."""
    logger = logging.getLogger("pydicom")
    if not any(isinstance(f, RedactQuotedValues) for f in logger.filters):
        logger.addFilter(RedactQuotedValues())
    warnings.filterwarnings("ignore", message=r"Invalid value for VR", category=UserWarning)
    warnings.filterwarnings("ignore", message=r".*[Ii]nvalid value", module=r"pydicom\..*")
