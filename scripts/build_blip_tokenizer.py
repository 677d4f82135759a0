"""Build the word-level BERT tokenizer shipped with the shapes-world BLIP, offline.

Run with the project's environment (transformers only; no hub access)::

    .venv/bin/python scripts/build_blip_tokenizer.py

What it does
------------
1. Writes a vocabulary: the five BERT special tokens ([PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3,
   [MASK] 4), then every word the shapes world's captions use (``cliplens.worlds.shapes``:
   the colour and shape names, "a", "and"), every word of the prompt templates in
   ``cliplens.eval.templates`` ("a photo of a {}." and the 80 ImageNet ones), a few more
   words a person is likely to type about these scenes, the ten digits and the basic
   punctuation marks. There are no ``##`` word pieces, so each word either is in the
   vocabulary whole or becomes [UNK]: any prompt tokenizes, none fails.
2. Builds ``transformers.BertTokenizer(vocab=dict)`` (the tokenizers-backed WordPiece
   tokenizer; lower-cases, strips accents, splits punctuation off words) and gives it
   ``model_input_names = ["input_ids", "attention_mask"]``: a BLIP model takes no
   ``token_type_ids``, so ``model(**tokenizer(...), pixel_values=...)`` just works.
3. Saves it into the model folder (``save_pretrained``), loads it back with
   ``AutoTokenizer.from_pretrained`` (offline) and stops if any id differs.

Every text the model sees is ``[CLS] words [SEP]``, padded on the right with [PAD] (id 0)
to the longest in the batch, with an attention mask of 1 on the real tokens.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import cliplens  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(ROOT / "src"))

from cliplens.eval.templates import TEMPLATE_SETS
from cliplens.worlds import shapes

DEFAULT_OUT = ROOT / "src" / "cliplens" / "assets" / "shapes-blip"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MAX_LENGTH = 32  # = the text encoder's max_position_embeddings
# Words beyond the captions and the templates that prompts about these scenes tend to use.
EXTRA_WORDS = (
    "an the this that there is are with without no not one two three four five many some "
    "shape shapes object objects thing colour color coloured colored image picture scene "
    "background grey gray white black brown pink "
    "circles squares triangles stars crosses big small large tiny left right top bottom "
    "above below next to near on in behind front middle center centre"
)
PUNCTUATION = list(".,!?;:'\"-()[]{}/&+*#%$@<>=_|~`^\\")
DIGITS = [str(d) for d in range(10)]


def words_of(text: str) -> list[str]:
    """Lower-cased words of ``text`` as BERT's pre-tokenizer splits them (punctuation apart)."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def build_vocab() -> dict[str, int]:
    """Token -> id: the special tokens, then the world's words, then the rest (no duplicates)."""
    words: list[str] = []
    for label in shapes.all_labels():  # colour and shape names
        words += words_of(shapes.compositional_caption([label, label]))
    for templates in TEMPLATE_SETS.values():
        for template in templates:
            words += words_of(template.replace("{}", " "))
    words += EXTRA_WORDS.split() + DIGITS + PUNCTUATION
    vocab: dict[str, int] = {}
    for token in SPECIALS + words:
        vocab.setdefault(token, len(vocab))
    return vocab


def build_tokenizer(vocab: dict[str, int]):
    from transformers import BertTokenizer

    return BertTokenizer(
        vocab=dict(vocab),
        do_lower_case=True,
        model_max_length=MAX_LENGTH,
        model_input_names=["input_ids", "attention_mask"],
    )


def check_round_trip(tokenizer, folder: Path, vocab: dict[str, int]) -> None:
    """Load the saved tokenizer back offline and compare ids on a set of strings."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    texts = shapes.all_captions() + [
        shapes.compositional_caption(["red circle", "blue star"]),
        "a photo of a green square.",
        "A Purple CROSS!",
        "an orange star, next to a red circle",
        "numbers 12345 and 3.14",
        "a zebra in a café",
        "",
    ]
    for text in texts:
        a, b = tokenizer(text)["input_ids"], loaded(text)["input_ids"]
        if a != b:
            raise SystemExit(f"round trip changed the ids of {text!r}: {a} != {b}")
    if sorted(loaded(texts[0]).keys()) != ["attention_mask", "input_ids"]:
        raise SystemExit(f"the loaded tokenizer returns {sorted(loaded(texts[0]).keys())}")
    if loaded.get_vocab() != vocab:
        raise SystemExit("the loaded vocabulary differs from the one written")
    for label in shapes.all_labels():  # every caption word is a whole token
        ids = loaded(shapes.caption(label))["input_ids"]
        if vocab["[UNK]"] in ids or ids[0] != vocab["[CLS]"] or ids[-1] != vocab["[SEP]"]:
            raise SystemExit(f"{shapes.caption(label)!r} tokenizes to {ids}")


def main() -> None:
    ap = argparse.ArgumentParser(description="Build the shapes-world BLIP tokenizer offline.")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    vocab = build_vocab()
    tokenizer = build_tokenizer(vocab)
    # Save into a scratch folder first, so that a failed check leaves the model folder alone.
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        check_round_trip(tokenizer, Path(tmp), vocab)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.out)
    check_round_trip(tokenizer, args.out, vocab)
    sample = shapes.compositional_caption(["red triangle", "blue circle"])
    enc = tokenizer(sample)
    print(
        f"{len(vocab)} tokens; {sample!r} -> {tokenizer.convert_ids_to_tokens(enc['input_ids'])} "
        f"= {enc['input_ids']}"
    )
    print(f"saved to {args.out}: {sorted(p.name for p in args.out.iterdir())}")


if __name__ == "__main__":
    main()
