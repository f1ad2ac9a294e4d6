"""Standard-library packages the gateway's libraries import but a running gateway never uses.

python-statemachine imports ``asyncio`` for its async engine; our machines are synchronous,
so the sync engine never touches it. paho-mqtt imports ``urllib.request`` to read proxy
settings from the environment, and consults it only when PySocks is installed (paho's
``Client._get_proxy``). Together with what they pull in (``http``, ``email``,
``asyncio``'s 28 submodules) they are ~2.6 MB of idle RSS (tools/bench_rest.py), the
difference between 41.9 and 39.3 MB.

``defer`` puts an empty module object in ``sys.modules`` for each; the first attribute
read runs the real module's code into that same object, so every holder of the name sees
the loaded module afterwards. ``importlib.util.LazyLoader`` cannot do this on Python 3.11:
the ``import`` statement itself reads ``__spec__`` from a module it finds in
``sys.modules``, and any attribute read makes LazyLoader load. Here ``__spec__`` is a plain
attribute of the empty module, so only a use of the module loads it.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import types
from collections.abc import Iterable

UNUSED_WHILE_RUNNING = ("asyncio", "urllib.request")

_LOCK = "__teg_deferred_lock__"
_LOADING = "__teg_deferred_loading__"


class DeferredModule(types.ModuleType):
    """A module whose code has not run yet; reading a missing attribute runs it (once, under a lock)."""

    def __getattr__(self, name: str) -> object:
        lock = self.__dict__.get(_LOCK)
        if lock is not None:
            with lock:  # a second thread waits for the first one's load instead of reading a half-run module
                if type(self) is DeferredModule and _LOADING not in self.__dict__:
                    self._load()
        # While loading, the module's own code asks for submodules it has not imported yet:
        # the ordinary lookup answers (AttributeError) as it would for any module mid-import.
        return types.ModuleType.__getattribute__(self, name)

    def _load(self) -> None:
        spec = self.__spec__
        assert spec is not None and spec.loader is not None
        self.__dict__[_LOADING] = True
        try:
            spec.loader.exec_module(self)
        finally:
            del self.__dict__[_LOADING]
        self.__class__ = types.ModuleType
        del self.__dict__[_LOCK]


def defer(names: Iterable[str] = UNUSED_WHILE_RUNNING) -> list[str]:
    """Defer each module not imported yet; returns the names deferred (an absent module is left alone)."""
    deferred = []
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        module.__class__ = DeferredModule
        module.__dict__[_LOCK] = threading.RLock()
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:  # ``import urllib.request`` then reads ``request`` from the ``urllib`` package
            setattr(sys.modules[parent], child, module)
        deferred.append(name)
    return deferred


def loaded(name: str) -> bool:
    """Whether ``name`` has been imported and its code has run (not merely deferred)."""
    module = sys.modules.get(name)
    return module is not None and type(module) is not DeferredModule
