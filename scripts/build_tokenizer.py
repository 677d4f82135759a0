"""Build the CLIP tokenizer shipped with the shapes model, offline, and its golden ids.

Run with an environment that has open_clip (for its BPE file and reference tokenizer) and
transformers, e.g. ``/work/venv-oc/bin/python scripts/build_tokenizer.py``.

What it does
------------
1. Reads open_clip's ``bpe_simple_vocab_16e6.txt.gz`` and rebuilds the 49,408-entry CLIP
   vocabulary the way OpenAI's tokenizer does (256 byte symbols, the same with ``</w>``,
   48,894 merges, then start/end of text).
2. Builds ``transformers.CLIPTokenizer(vocab=dict, merges=list_of_pairs)``. (In
   transformers 5.x, ``vocab_file=``/``merges_file=`` are silently ignored and give wrong
   ids, so the file paths are never passed.)
3. Checks its ids against ``open_clip.tokenizer.tokenize`` on a set of strings and stops
   if any differ (outside the documented divergences below).
4. Saves the tokenizer into the model folder (``save_pretrained``) and writes the golden
   ids to ``tests/data/clip_token_ids.json``.

Known divergences (recorded in the golden file, not failures): open_clip cleans text with
``ftfy.fix_text`` and ``html.unescape`` before tokenizing; transformers' CLIP tokenizer
only does NFC, whitespace folding and lower-casing. Strings with HTML entities or with the
characters ftfy rewrites (curly quotes, full-width forms, ligatures) tokenize differently,
and so does text containing the literal strings ``<|startoftext|>``/``<|endoftext|>``.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "src" / "cliplens" / "assets" / "shapes-clip"
DEFAULT_GOLDEN = ROOT / "tests" / "data" / "clip_token_ids.json"
CONTEXT_LENGTH = 77

# Strings both tokenizers must agree on.
AGREE = [
    "a red triangle",
    "a blue circle and a yellow star",
    "A Purple CROSS",
    "a green square.",
    "an orange star, next to a red circle!",
    "  lots   of\twhitespace\n here  ",
    "",
    "the cat's toy isn't here, we'll see; they're fine",
    "numbers 12345 and 3.14159 and 1,000,000",
    "punctuation!!! ??? ... --- (brackets) [square] {curly} <angle>",
    "e-mail: someone@example.com #hashtag $100 50% a&b",
    "café naïve résumé façade",
    "Ünïcödé: straße, smørrebrød, ångström",
    "日本語のテキスト",
    "emoji 🙂🔺🟦 shapes",
    "a photo of a dog",
    "a diagram",
    "unbelievably antidisestablishmentarianism supercalifragilisticexpialidocious",
    " ".join(["a red triangle and a blue circle"] * 12),  # longer than 77 tokens: truncated
]

# Strings where the two tokenizers differ by design (open_clip's ftfy/html cleaning).
DIVERGE = [
    "it\u2019s a \u201cquoted\u201d word",
    "fish &amp; chips",
    # transformers treats its own special-token spellings in text as the special tokens;
    # open_clip's specials are spelled <start_of_text>/<end_of_text>, so it BPE-encodes these.
    "<|startoftext|> literal special tokens <|endoftext|>",
]


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable unicode character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table  # insertion order (printable bytes first) is the vocabulary order


def read_bpe(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    # The first line is a version header; CLIP keeps 49152 - 256 - 2 merges.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    assert all(len(m) == 2 for m in merges), "malformed merge line"
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens) == 49408, len(vocab)
    return vocab, merges  # type: ignore[return-value]


def hf_ids(tok, text: str) -> list[int]:
    return tok(text, truncation=True, max_length=CONTEXT_LENGTH)["input_ids"]


def open_clip_ids(text: str) -> list[int]:
    from open_clip import tokenizer as oc_tok

    row = oc_tok.tokenize([text], context_length=CONTEXT_LENGTH)[0].tolist()
    # open_clip pads with 0 after the end-of-text token; keep up to and including it.
    end = row.index(oc_tok._tokenizer.eot_token_id)
    return row[: end + 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model folder to save the tokenizer into")
    ap.add_argument("--golden", type=Path, default=DEFAULT_GOLDEN)
    args = ap.parse_args()

    import open_clip
    import transformers
    from open_clip.tokenizer import default_bpe
    from transformers import CLIPTokenizer

    vocab, merges = read_bpe(Path(default_bpe()))
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CONTEXT_LENGTH)
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407, (tok.bos_token_id, tok.eos_token_id)

    agree, diverge = [], []
    bad = []
    for text in AGREE:
        ours, ref = hf_ids(tok, text), open_clip_ids(text)
        if ours != ref:
            bad.append((text, ours, ref))
        agree.append({"text": text, "ids": ref})
    for text in DIVERGE:
        ours, ref = hf_ids(tok, text), open_clip_ids(text)
        if ours == ref:
            print(f"note: expected divergence did not happen for {text!r}")
        diverge.append({"text": text, "open_clip_ids": ref, "transformers_ids": ours})
    if bad:
        for text, ours, ref in bad:
            print(f"MISMATCH {text!r}\n  transformers {ours}\n  open_clip    {ref}")
        raise SystemExit("tokenizer ids differ from open_clip; nothing written")
    print(f"ids match open_clip on all {len(AGREE)} strings")

    args.out.mkdir(parents=True, exist_ok=True)
    # Save a fresh instance (the checked one carries per-call truncation state), then
    # rewrite tokenizer.json without indentation: half the size, same content.
    CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CONTEXT_LENGTH).save_pretrained(args.out)
    tj = args.out / "tokenizer.json"
    data = json.loads(tj.read_text(encoding="utf-8"))
    tj.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    # Reload from disk and check again: what ships is what was verified.
    reloaded = CLIPTokenizer.from_pretrained(args.out)
    for entry in agree:
        assert hf_ids(reloaded, entry["text"]) == entry["ids"], entry["text"]
    print(f"saved tokenizer to {args.out}")

    golden = {
        "about": "CLIP BPE token ids from open_clip.tokenizer.tokenize (context 77, truncated with "
        "end-of-text last, padding removed). Written by scripts/build_tokenizer.py.",
        "open_clip_version": open_clip.__version__,
        "transformers_version": transformers.__version__,
        "context_length": CONTEXT_LENGTH,
        "cases": agree,
        "known_divergences": {
            "why": "open_clip runs ftfy.fix_text and html.unescape before BPE; transformers does not.",
            "cases": diverge,
        },
    }
    args.golden.parent.mkdir(parents=True, exist_ok=True)
    args.golden.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.golden}")


if __name__ == "__main__":
    main()
