"""Adapter methods (one file each: LoRA/LoCon, LoHa, LoKr, OFT, BOFT, GLoRA; DoRA on top of the low-rank ones), how
they attach to SD models (:mod:`methods.network`, :mod:`methods.arch`), their files (:mod:`methods.files`) and the
operations on those files (:mod:`methods.tools`). The contract a method implements: :class:`AdapterModule`."""

from .base import AdapterConfig, AdapterModule, ConfigError
from .registry import available_methods, get_method, register

__all__ = ["AdapterConfig", "AdapterModule", "ConfigError", "available_methods", "get_method", "register"]
