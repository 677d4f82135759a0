"""The Hugging Face hub as the loaders see it: the local cache first, the network only when the
hub is reachable and offline mode is off. Used by the transformers loaders and by open_clip's.

Nothing here imports transformers, open_clip or torchvision.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from ..errors import ModelLoadError


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` switches the hub off."""
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint (``HF_ENDPOINT``) opens within ``timeout``."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(message: str) -> None:
    """Raise a :class:`ModelLoadError` unless downloading is possible. ``message`` says what is
    missing, with ``{why}`` where the reason goes ("is off (offline mode)" / "cannot be reached")."""
    if offline():
        raise ModelLoadError(message.replace("{why}", "is off (offline mode)"))
    if not hub_reachable():
        raise ModelLoadError(message.replace("{why}", "cannot be reached"))


def in_cache(repo: str, filenames: list[str]) -> bool:
    """Whether any of ``filenames`` of hub repository ``repo`` is in the local cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in filenames)


def read_processor_config(directory: str | Path | None) -> dict | None:
    """The ``preprocessor_config.json`` of a checkpoint directory as a dict, or None."""
    if directory is None:
        return None
    path = Path(directory) / "preprocessor_config.json"
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def cached_processor_config(name: str) -> dict | None:
    """The cached ``preprocessor_config.json`` of hub repository ``name``, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    cached = try_to_load_from_cache(name, "preprocessor_config.json")
    if isinstance(cached, str):
        return read_processor_config(Path(cached).parent)
    return None


def hub_config(name: str):
    """``(config, local)``: the transformers config of hub repository ``name`` from the cache
    (``local`` True), else downloaded when the hub can be used. One-line ModelLoadError otherwise."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, local_files_only=True), True
    except (OSError, ValueError):
        pass
    require_hub(
        f"model '{name}' is not in the local Hugging Face cache and the hub {{why}}"
        "; pass a local checkpoint directory (--model ./my-clip) or use the embedded model (--model shapes)"
    )
    try:
        return AutoConfig.from_pretrained(name), False
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model '{name}': {str(exc).splitlines()[0]}") from None
