"""The formula's Salt modules, imported from the checkout for the unit tests.

Salt's loader imports ``_modules/<name>.py`` and ``_states/<name>.py`` under
names of its own, with its dunders (``__salt__``, ``__opts__``, ...)
injected. Here each file is imported once per test run under a name that
tells the two folders apart (``haproxy_runtime`` is both), and the tests
give it the dunders through pytest-salt-factories' loader mocks: a
``configure_loader_modules`` fixture in the test module returns
``{module: {"__salt__": {...}, "__opts__": {...}}}``, set up before each
test and undone after it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def _load(folder: str, name: str) -> ModuleType:
    qualified = f"formula{folder}_{name}"  # formula_modules_tproxy, formula_states_tproxy
    if qualified in sys.modules:
        return sys.modules[qualified]
    spec = importlib.util.spec_from_file_location(qualified, REPO / folder / f"{name}.py")
    assert spec and spec.loader, f"{folder}/{name}.py"
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[qualified]
        raise
    return module


def execution_module(name: str) -> ModuleType:
    """``_modules/<name>.py``."""
    return _load("_modules", name)


def state_module(name: str) -> ModuleType:
    """``_states/<name>.py``."""
    return _load("_states", name)
