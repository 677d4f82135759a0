"""Normalising, colouring and overlaying maps; kept apart from the raw results."""

from .colors import colorize, normalise
from .overlay import overlay
from .report import token_html, write_report

__all__ = ["colorize", "normalise", "overlay", "token_html", "write_report"]
