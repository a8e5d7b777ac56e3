"""The two shapes of progress callback the library, the tasks and the CLI pass around, defined once so that a
command's bars and the work that feeds them agree on the arguments. Imports no torch (nor anything else heavy), so the
CLI can name the types without loading the library.
"""

from __future__ import annotations

from collections.abc import Callable

CountProgress = Callable[[int, int], None]
"""on_progress(done, total): one piece of work counted up to a known total (bytes hashed, completions run), so a caller
can draw a single bar."""

DescribedProgress = Callable[[str, int, int], None]
"""on_progress(description, done, total): work in named parts (files uploaded, stages of an evaluation), so a caller
can draw a bar per description."""
