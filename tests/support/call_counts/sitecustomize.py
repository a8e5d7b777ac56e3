"""Counts calls of named product functions in every Python process of a process tree (the CLI, the Prefect flow it
runs, each torchrun rank), for tests/integration/test_run_plan_counts.py.

Active only when $WMTP_CALL_COUNTS names a directory: this directory is then put first on PYTHONPATH, so Python
imports this file at start-up. Each named function is wrapped as soon as its module has executed (before any other
module can bind it with `from ... import`), and each process writes {"module.function": calls} to
$WMTP_CALL_COUNTS/<pid>.json when it exits.
"""

from __future__ import annotations

import atexit
import functools
import importlib.abc
import json
import os
import sys
from collections import Counter
from pathlib import Path

COUNTED = {
    "wmtp_core.fixplan.gates": ("resolve_gates",),
    "wmtp_core.runtime.devices": ("plan_devices", "apply_device_profile"),
    "wmtp_core.fixplan.legacy": ("plan_devices_as_configured", "recipe_as_configured"),
    "wmtp_core.checkpoint.manifest": ("_step_dirs",),
    "wmtp_core.data.records": ("read_data_file",),
}
_calls: Counter[str] = Counter()


def _counted(name: str, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        _calls[name] += 1
        return function(*args, **kwargs)

    return wrapper


class _WrappingLoader(importlib.abc.Loader):
    def __init__(self, loader, names):
        self.loader, self.names = loader, names

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        for name in self.names:
            setattr(module, name, _counted(f"{module.__name__}.{name}", getattr(module, name)))


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in COUNTED:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                spec.loader = _WrappingLoader(spec.loader, COUNTED[fullname])
                return spec
        return None


def _write() -> None:
    Path(os.environ["WMTP_CALL_COUNTS"], f"{os.getpid()}.json").write_text(json.dumps(dict(_calls)))


if os.environ.get("WMTP_CALL_COUNTS"):
    sys.meta_path.insert(0, _Finder())
    atexit.register(_write)
