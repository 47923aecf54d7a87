"""Log files hold plain text: no ANSI colour codes.

Flower's console handler colours its level names (``\\x1b[92mINFO \\x1b[0m:``) whether or not
its stream is a terminal; a session's, simulation's or device's stderr is a log file, where
those codes are noise to ``grep``, editors and the failure reasons read back from the log.
Each such process calls ``plain_logs()`` first thing. Standard library only (Flower is
configured only if it is installed and already imported or importable).
"""

from __future__ import annotations

import logging
import re

#: CSI sequences (colours, cursor moves) as loggers and progress bars write them
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences."""
    return ANSI.sub("", text)


class PlainFormatter(logging.Formatter):
    """A formatter whose output never carries ANSI codes (a message may bring its own)."""

    def format(self, record: logging.LogRecord) -> str:
        return strip_ansi(super().format(record))


def plain_logs() -> None:
    """Turn off the colours of Flower's console handler in this process."""
    try:
        from flwr.common.logger import update_console_handler
    except ImportError:  # Flower is not installed: nothing colours our logs
        return
    update_console_handler(colored=False)
