"""Attribution methods, one file each, registered by name.

The CLI choices, ``cliplens methods``, the docs list and the contract tests all read
:data:`REGISTRY`. A method module registers its class with :func:`register`.
"""

from __future__ import annotations

from .base import REGISTRY, Attribution, Method, MethodResult, get_method, list_methods, register

# Importing the modules registers the methods, in this order (the CLI, docs and demo list them so).
from . import chefer  # noqa: E402,F401,I001
from . import legrad, rollout, raw_attention, gradcam, sensitivity, decomposition  # noqa: E402,F401
from . import interactions, jacobian_interactions, grad_eclip  # noqa: E402,F401

__all__ = ["REGISTRY", "Attribution", "Method", "MethodResult", "get_method", "list_methods", "register"]
