"""Former name of :mod:`cliplens.files` (the one way result files are written); kept importable."""

from .files import slug, staged_dir

__all__ = ["slug", "staged_dir"]
