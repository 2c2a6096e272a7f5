"""Anomaly detectors (methods.md §3) under one contract (:mod:`.base`)."""

from . import autoencoders, flows  # noqa: F401  (register their detectors)
from .base import *  # noqa: F401, F403
