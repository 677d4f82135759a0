"""Former name of :mod:`cliplens.viz.html`; kept importable."""

from .html import Card, Section, token_html, write_page

write_report = write_page

__all__ = ["Card", "Section", "token_html", "write_page", "write_report"]
