"""
salt-ssh: ``mtproxy.settings`` and ``mtproxy.links`` with the settings layered on the master.

A salt-ssh target has no Salt file server outside a state run, so the
execution module's :func:`settings` cannot read
``salt://mtproxy/parameters/`` there. salt-ssh runs a wrapper module's
function on the master side in place of the target's function of the same
name; these run the formula's own ``_modules/mtproxy.py`` there, with
salt-ssh's ``__salt__``: the parameter files, pillar and grains come from
the master, and ``mtproxy_bootstrap.resolve`` (validation, the secret file,
the checks of the host) runs on the target, in one ssh round trip. The
state run's ``map.jinja`` comes through here too.

salt-ssh finds this folder through the master's ``module_dirs`` (the
formula's checkout, see examples/master.conf): Salt 3008 loads wrappers
again with the target's options after the first lookup, and only
``module_dirs`` is carried over; a wrapper synced with
``salt-run saltutil.sync_wrapper`` is found the first time but not then.

CLI Example:

.. code-block:: bash

    salt-ssh mtproxy1 mtproxy.links
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import salt.exceptions
import salt.loader
import salt.utils.files
import salt.utils.stringutils

__virtualname__ = "mtproxy"


def __virtual__():
    return __virtualname__


class _MasterFiles(Mapping):
    """
    salt-ssh's ``__salt__``, but ``cp.get_file_str`` reads the master's file
    server here: salt-ssh's own copies the file to the target and then opens
    the target's path on the master, which fails unless both share a disk.
    Holds the objects themselves: the dunders resolve in the loader running.
    """

    def __init__(self, functions: Any, fileclient: Any):
        self.functions = functions
        self.fileclient = fileclient

    def get_file_str(self, path: str, saltenv: str = "base") -> str | bool:
        cached = self.fileclient.cache_file(path, saltenv)
        if not cached:
            return False
        with salt.utils.files.fopen(cached, "r") as handle:
            return salt.utils.stringutils.to_unicode(handle.read())

    def __getitem__(self, name: str) -> Any:
        return self.get_file_str if name == "cp.get_file_str" else self.functions[name]

    def __contains__(self, name: object) -> bool:
        return name == "cp.get_file_str" or name in self.functions

    def __iter__(self) -> Iterator[str]:
        return iter(self.functions)

    def __len__(self) -> int:
        return len(self.functions)


def _formula() -> Any:
    """The formula's execution module ``mtproxy``, loaded on this side with salt-ssh's ``__salt__``."""
    key = "mtproxy.formula_module"
    if key not in __context__:
        # salt.loader.raw_mod, with the formula's _utils importable as for any execution module.
        utils = salt.loader.utils(__opts__)
        loader = salt.loader.LazyLoader(
            salt.loader._module_dirs(__opts__, "modules", "module"),
            __opts__,
            tag="rawmodule",
            virtual_enable=False,
            pack={
                "__salt__": _MasterFiles(__salt__.value(), __context__["fileclient"]),
                "__utils__": utils,
                # This run's pillar, with a CLI pillar= merged in by the state functions.
                "__pillar__": __pillar__.value(),
                "__grains__": __grains__.value(),
            },
            extra_module_dirs=utils.module_dirs,
        )
        if "mtproxy" not in loader.file_mapping or not loader._load_module("mtproxy"):
            raise salt.exceptions.CommandExecutionError(
                "mtproxy: cannot load the formula's _modules/mtproxy.py on the master: put the formula's "
                f"checkout on the master's module_dirs ({loader.missing_modules.get('mtproxy', 'not found')})"
            )
        __context__[key] = loader
    return __context__[key]


def settings(show_secrets: bool = False, tplroot: str = "mtproxy", bootstrapping: bool = False) -> dict:
    """``mtproxy.settings``, layered on the master (see the module's docstring)."""
    return _formula()["mtproxy.settings"](show_secrets=show_secrets, tplroot=tplroot, bootstrapping=bootstrapping)


def links(masked: bool = False, cell: dict | None = None) -> list[dict]:
    """``mtproxy.links``, from the settings layered on the master."""
    return _formula()["mtproxy.links"](masked=masked, cell=cell)
