"""Modules Twisted and jsonschema import at start-up but a server rarely uses,
loaded on first use instead (about 6 MiB resident at idle).

- ``twisted.internet.defer`` imports ``asyncio`` (for ``Deferred.asFuture``,
  ``fromFuture`` and ``iscoroutine``), which brings ``ssl``, ``concurrent.futures``,
  ``subprocess`` and the rest of asyncio, in a process that runs no asyncio loop.
- ``twisted.python.compat`` imports ``http.cookiejar`` (as ``compat.cookielib``,
  for old code) and ``xml.sax`` (for Twisted's HTML templates) imports
  ``urllib.request``; each brings ``http.client`` and again ``ssl``.
- ``twisted.web.http`` imports ``email.message`` for form bodies, which Matrix
  never sends (the listener's requests skip form parsing).
- ``twisted.web.server`` imports ``twisted.web.util`` (error pages in HTML, with
  the template machinery and ``xml.sax``) and ``twisted.spread.pb`` (to make a
  request copyable over Perspective Broker), which brings ``pickle``.
- ``jsonschema`` imports ``fractions`` (and ``decimal``) for one corner of
  ``multipleOf``.

``defer_unused_imports`` puts a stand-in for each in ``sys.modules`` before Twisted
is imported. A stand-in is the real module object, not yet executed: its code runs
(once, under a lock) at the first access to an attribute it does not have, so
``import asyncio`` followed by ``asyncio.get_event_loop()`` works as usual.

A few stand-ins start with the names their importer takes with ``from ... import``
(which would otherwise load them at once): ``asyncio.iscoroutine`` (the same test
asyncio makes), ``AbstractEventLoop`` and ``Future`` (only in ``defer``'s
annotations), ``email.message.EmailMessage`` and ``fractions.Fraction`` (callables
that load the module and call the real one), ``pb.Copyable`` (a plain base class
for Twisted's ``Request``). ``withdraw_presets``, once the server's modules are
imported, takes those names back: from then on anyone asking for them gets the
real ones (``email.message.Message`` as a base class, in ``importlib.metadata``).

Only the server's entry point (``python -m homeserver.app run``) uses this.
"""

import collections.abc
import importlib.util
import sys
import threading
import types
from typing import Any

_lock = threading.RLock()

_COROUTINE_TYPES = (types.CoroutineType, types.GeneratorType, collections.abc.Coroutine)
_coroutine_types_seen: set[type] = set()


def iscoroutine(obj: object) -> bool:
    """``asyncio.iscoroutine`` as of Python 3.11 (generators count as coroutines)."""
    if type(obj) in _coroutine_types_seen:
        return True
    if isinstance(obj, _COROUTINE_TYPES):
        if len(_coroutine_types_seen) < 100:
            _coroutine_types_seen.add(type(obj))
        return True
    return False


class _NotCopyable:
    """In place of ``twisted.spread.pb.Copyable`` as a base of ``twisted.web.server.Request``
    (which Twisted makes copyable over Perspective Broker, which nothing here uses)."""


class _IdnaErrorUntilLoaded(ValueError):
    """``idna.IDNAError`` in jsonschema's ``idn-hostname`` format check (formats are
    not checked here) until idna loads."""


class _AnnotationOnly:
    """Stands for an asyncio class in Twisted's annotations until asyncio loads."""


class _LoadedOnFirstUse(types.ModuleType):
    """A module whose code runs at the first access to an attribute it lacks."""

    def __getattr__(self, name: str) -> Any:
        if name == "__path__":  # the import system asks whether it is a package: it is not
            raise AttributeError(name)
        _load(self)
        try:
            return self.__dict__[name]
        except KeyError:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}") from None


def _load(module: types.ModuleType) -> None:
    with _lock:
        state = module.__dict__
        if not state.get("_hs_loading"):
            state["_hs_loading"] = True
            state["__spec__"].loader.exec_module(module)


def _forwarder(module_name: str, name: str) -> Any:
    """Stands for a function or class of a module not loaded yet: calling it loads the
    module and calls the real one."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        module = sys.modules[module_name]
        _load(module)
        return module.__dict__[name](*args, **kwargs)

    forward.__name__ = forward.__qualname__ = name
    return forward


# The stand-ins installed, with the names they were given before loading.
_presets: dict[str, tuple[str, ...]] = {}


def _stand_in(name: str, attributes: dict[str, Any]) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    module.__class__ = _LoadedOnFirstUse
    module.__dict__.update(attributes)
    _presets[name] = tuple(attributes)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(importlib.import_module(parent), child, module)


def defer_unused_imports() -> None:
    """Install the stand-ins (see the module docstring). Call it before Twisted is imported."""
    _stand_in(
        "asyncio",
        {
            "iscoroutine": iscoroutine,
            "AbstractEventLoop": _AnnotationOnly,
            "Future": _AnnotationOnly,
        },
    )
    _stand_in("http.cookiejar", {})
    _stand_in("urllib.request", {})
    _stand_in("pickle", {})
    _stand_in("email.message", {
        "EmailMessage": _forwarder("email.message", "EmailMessage"),
        "Message": _forwarder("email.message", "Message"),
    })
    _stand_in("twisted.web.util", {})
    _stand_in("twisted.spread.pb", {
        "Copyable": _NotCopyable,
        "ViewPoint": _forwarder("twisted.spread.pb", "ViewPoint"),
    })
    _stand_in("fractions", {"Fraction": _forwarder("fractions", "Fraction")})
    _stand_in("rfc3339_validator", {
        "validate_rfc3339": _forwarder("rfc3339_validator", "validate_rfc3339"),
    })
    _stand_in("uuid", {"UUID": _forwarder("uuid", "UUID")})
    _stand_in("pprint", {"pformat": _forwarder("pprint", "pformat")})
    _stand_in("zipfile", {})
    _stand_in("bz2", {})
    _stand_in("lzma", {})
    _stand_in("idna", {"IDNAError": _IdnaErrorUntilLoaded})


def withdraw_presets() -> None:
    """Take back the names the stand-ins were given for the modules that import them at
    start-up, so that any later use of those names gets the real ones (loading the
    module): ``asyncio.Future`` or ``email.message.Message`` as a base class, say."""
    with _lock:
        for name, attributes in _presets.items():
            module = sys.modules.get(name)
            if isinstance(module, _LoadedOnFirstUse) and not module.__dict__.get("_hs_loading"):
                for attribute in attributes:
                    module.__dict__.pop(attribute, None)
        _presets.clear()


def release_startup_modules() -> None:
    """Forget the modules only start-up needs (PyYAML, for the config files): their
    memory goes back to the allocator for what the server builds later. Anything
    that needs them again imports them again."""
    for name in [n for n in sys.modules if n == "yaml" or n.startswith("yaml.")]:
        del sys.modules[name]


def loaded(name: str) -> bool:
    """Whether ``name`` is imported and, if it has a stand-in, its code has run."""
    module = sys.modules.get(name)
    if module is None:
        return False
    return not isinstance(module, _LoadedOnFirstUse) or bool(module.__dict__.get("_hs_loading"))
