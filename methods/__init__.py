"""Adapter methods (LoRA/LoCon, LoHa, LoKr, OFT, BOFT, DoRA), how they attach to SD models, and their files."""

from .base import AdapterConfig, AdapterModule, ConfigError
from .registry import available_methods, get_method, register

__all__ = ["AdapterConfig", "AdapterModule", "ConfigError", "available_methods", "get_method", "register"]
