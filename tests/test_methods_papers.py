"""Every registered method carries a paper note (the reference repository, what was compared and
how close), printed by `cliplens methods` and repeated in docs/methods.md."""

from __future__ import annotations

from pathlib import Path

from cliplens.cli import main
from cliplens.methods import REGISTRY
from cliplens.methods.papers import PAPERS, paper_note

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def test_every_method_has_a_paper_note():
    names = {n for n in REGISTRY if not n.startswith("_")}
    assert names <= set(PAPERS), sorted(names - set(PAPERS))
    for name in names:
        note = paper_note(name)
        assert "Compared" in note, name


def test_cliplens_methods_prints_the_notes(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert out.count("paper: ") == len([n for n in REGISTRY if not n.startswith("_")])
    assert "legrad-torch 1.1" in out


def test_docs_list_the_paper_notes():
    text = DOCS.read_text()
    for name, note in PAPERS.items():
        assert f"| `{name}` | {note} |" in text, name
