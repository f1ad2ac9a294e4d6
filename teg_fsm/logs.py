"""Logging set-up, with secrets kept out of every record."""

from __future__ import annotations

import logging
import re

_SECRET_PATTERNS = (
    re.compile(r'("?(?:credentialsValue|provisionDeviceSecret|accessToken|token|password)"?\s*[:=]\s*"?)([^",\s}]+)', re.I),
)


class RedactSecrets(logging.Filter):
    """Masks values of secret-looking keys in formatted messages."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = message
        for pattern in _SECRET_PATTERNS:
            redacted = pattern.sub(r"\1***", redacted)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level, logging.INFO))
