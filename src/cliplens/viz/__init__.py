"""Normalising, colouring and overlaying maps; kept apart from the raw results."""

from .colors import colorize, normalise
from .html import Card, Section, token_html, write_page
from .overlay import overlay
from .report import write_report

__all__ = ["Card", "Section", "colorize", "normalise", "overlay", "token_html", "write_page", "write_report"]
