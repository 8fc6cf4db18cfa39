"""Rankwright's training engine: model loading, datasets, the training loop, sampling and saving.

Importing it first checks that this top-level ``trainer`` package is Rankwright's own (see
:mod:`trainer.install_check`): PyPI has another distribution named ``trainer``.
"""

from .install_check import check_installation

check_installation()
