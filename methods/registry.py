"""Method name → wrapper class. Each method file registers itself; adding a method touches one file."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from .base import AdapterModule, ConfigError

_METHODS: dict[str, type[AdapterModule]] = {}
_ALIASES: dict[str, str] = {}
_loaded = False


def register(cls: type[AdapterModule] | None = None, *, aliases: tuple[str, ...] = ()):
    """Class decorator: ``@register(aliases=("locon",))`` makes the method available by name."""

    def add(klass: type[AdapterModule]) -> type[AdapterModule]:
        if not klass.method:
            raise TypeError(f"{klass.__name__} must set a class attribute `method`")
        _METHODS[klass.method] = klass
        for alias in aliases:
            _ALIASES[alias] = klass.method
        return klass

    return add(cls) if cls is not None else add


def _load_all() -> None:
    """Import every module of the package once, so each method file can register itself."""
    global _loaded
    if _loaded:
        return
    package_dir = Path(__file__).parent
    for info in pkgutil.iter_modules([str(package_dir)]):
        importlib.import_module(f"{__package__}.{info.name}")  # a broken method file fails loudly, every time
    _loaded = True


def available_methods() -> list[str]:
    _load_all()
    return sorted(_METHODS)


def get_method(name: str) -> type[AdapterModule]:
    _load_all()
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _METHODS:
        raise ConfigError(f"unknown adapter method {name!r}; available: {', '.join(available_methods())}")
    return _METHODS[key]


def file_module_class(tensors: dict) -> type[AdapterModule]:
    """The class that reads a file module (suffix → tensor): the claiming method's :meth:`~AdapterModule.file_class`."""
    return method_for_file_module(set(tensors)).file_class(tensors)


def method_for_file_module(suffixes: set[str]) -> type[AdapterModule]:
    """Which method wrote a file module, from its tensor suffixes (``lora_up.weight``, ``hada_w1_a``, …)."""
    _load_all()
    matches = [cls for cls in _METHODS.values() if cls.claims(suffixes)]
    if len(matches) != 1:
        known = ", ".join(sorted(suffixes))
        raise ValueError(f"no single adapter method stores the tensors {known}" if not matches else
                         f"tensors {known} are claimed by several methods: {[m.method for m in matches]}")
    return matches[0]
