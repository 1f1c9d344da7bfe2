"""Prefect's temporary server dies with the evoforge process that started it.

With no PREFECT_API_URL (and no `evoforge ui` of this project up), Prefect runs a flow against a
temporary server: `uvicorn prefect.server.api.server:create_app` in a child process
(`SubprocessASGIServer`), stopped at exit. A process killed outright (SIGKILL, the OOM killer, a lost
node) runs no exit handler, and the server lived on without a parent, ~200 MB and a little CPU each,
for as long as the machine ran. Here the child is started with the kernel's parent-death signal
(data/children.py), so it goes with the process whatever ends it.

Prefect imports that module only when it needs the server (it takes ~2.7 s), so the change is made as
the module is imported, not before: `install()` puts a finder in front of the import system that
waits for it.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import subprocess
import sys
import threading
import types

SERVER_MODULE = "prefect.server.api.server"


class _PopenDyingWithUs(subprocess.Popen):
    """The server module's Popen: its child gets the parent-death signal when started from the main
    thread (the kernel signals when the starting *thread* ends; Prefect starts the server from the
    thread that first needs it, the main thread for a flow called there). Elsewhere it is Prefect's."""

    def __init__(self, *args, **kwargs):
        if threading.current_thread() is threading.main_thread() and kwargs.get("preexec_fn") is None:
            from evoforge.data.children import dies_with_this_process

            kwargs["preexec_fn"] = dies_with_this_process()
        super().__init__(*args, **kwargs)


def make_server_children_die_with_us(module: types.ModuleType) -> None:
    """Give the server module a `subprocess` of its own whose Popen is `_PopenDyingWithUs`: no other
    module's subprocess calls change."""
    module.subprocess = types.SimpleNamespace(**{**vars(subprocess), "Popen": _PopenDyingWithUs})


class _PatchServerModuleOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != SERVER_MODULE:
            return None
        sys.meta_path.remove(self)  # once: the spec below comes from the import system's own finders
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            load(module)
            make_server_children_die_with_us(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Make Prefect's temporary server (of this process, from now on) die with it."""
    if SERVER_MODULE in sys.modules:
        make_server_children_die_with_us(sys.modules[SERVER_MODULE])
    elif not any(isinstance(finder, _PatchServerModuleOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchServerModuleOnImport())
