"""Import the repository's command-line tools (``scripts/*.py``, ``slurm/*.py``) by file path.

They are scripts, not a package: nothing puts their folders on ``sys.path``. A loaded tool is registered
in ``sys.modules`` under its file stem so that its dataclasses and pickled functions resolve.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path: str) -> ModuleType:
    path = ROOT / relative_path
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() == path:
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# The same, as source for a probe run in a subprocess (``exec`` it, then call ``load_script``).
LOAD_SCRIPT_SOURCE = f"""
import importlib.util, sys
def load_script(relative_path):
    path = {str(ROOT)!r} + "/" + relative_path
    name = relative_path.rsplit("/", 1)[-1][:-3]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
"""
