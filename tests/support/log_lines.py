"""A logging handler that keeps the messages it is given, for tests of what a launcher logs."""

from __future__ import annotations

import logging


class Lines(logging.Handler):
    """Every message logged to it, in order, in .lines."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())
