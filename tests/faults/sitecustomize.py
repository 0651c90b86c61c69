"""Fault injection for the kill tests: SIGKILL a stage process at an exact point of its work.

Put this folder on PYTHONPATH and set TUNELINE_KILL to MAIN:MODULE:ATTRIBUTE:N, for example
    stages.convert:tuneline.tensor_io:ShardedSafetensorsWriter._close_shard:2
and the process running `python -m MAIN` kills itself with SIGKILL when ATTRIBUTE of MODULE is called for the
N-th time (before that call runs). Every other Python process (DVC itself, git hooks) is left alone: the
patch is installed when MODULE is imported and only fires under MAIN. Nothing is cleaned up, as with a
real kill -9.
"""

import functools
import importlib.abc
import importlib.util
import os
import signal
import sys

_MAIN, _MODULE, _ATTRIBUTE, _CALL = (os.environ.get("TUNELINE_KILL") or "::::0").split(":")


def _kill_on_call(function):
    calls = 0

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        nonlocal calls
        main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if main_spec is not None and main_spec.name == _MAIN:
            calls += 1
            if calls == int(_CALL):
                print(f"fault injection: SIGKILL at call {calls} of {_MODULE}.{_ATTRIBUTE}", file=sys.stderr,
                      flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)

    return wrapper


def _patch(module) -> None:
    owner_path, _, name = _ATTRIBUTE.rpartition(".")
    owner = module
    for part in filter(None, owner_path.split(".")):
        owner = getattr(owner, part)
    setattr(owner, name, _kill_on_call(getattr(owner, name)))


class _PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import MODULE as usual, then patch it, once."""

    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _patch(module)


if _MODULE in sys.modules:  # os, shutil, ...: imported before this file runs
    _patch(sys.modules[_MODULE])
elif _MODULE:
    sys.meta_path.insert(0, _PatchOnImport())
