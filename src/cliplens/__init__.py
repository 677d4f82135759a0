"""cliplens: why does a CLIP-family model match this image with this text?"""

__version__ = "0.1.0"

# The public names load on first use, so that ``import cliplens.cli`` (the console script) is
# quick and a Ctrl-C while torch loads reaches the CLI's handler instead of a traceback.
_LAZY = {
    "load_model": "adapters",
    "explain": "api",
    "similarity": "api",
    "CliplensError": "errors",
    "ImageError": "errors",
    "InputError": "errors",
    "ModelLoadError": "errors",
    "Explanation": "explanation",
    "RegionImage": "regions",
    "list_methods": "methods",
    "Contrast": "targets",
    "PairLogit": "targets",
    "PromptProbability": "targets",
    "Target": "targets",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    "explain",
    "similarity",
    "load_model",
    "list_methods",
    "Explanation",
    "RegionImage",
    "Target",
    "PairLogit",
    "PromptProbability",
    "Contrast",
    "CliplensError",
    "ImageError",
    "InputError",
    "ModelLoadError",
]
