"""Command line: thin wrappers around the public API."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import CliplensError, InputError

DEFAULT_MODEL = "openai/clip-vit-base-patch16"


def _parse_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InputError(f"--option takes KEY=VALUE, got {text!r}")
    for conv in (int, float):
        try:
            return key, conv(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    return key, value


def _read_texts(args) -> list[str]:
    texts = list(args.text or [])
    if args.texts_file:
        path = Path(args.texts_file)
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is no part of a prompt
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read the prompts file ({exc.__class__.__name__})") from None
        texts += [line.strip() for line in lines if line.strip()]
    if not texts:
        raise InputError("no prompts: give --text (repeatable) or --texts-file")
    return texts


def cmd_methods(args) -> int:
    from .methods import REGISTRY

    width = max(len(n) for n in REGISTRY)
    for name, cls in REGISTRY.items():
        if name.startswith("_"):
            continue
        towers = "+".join(cls.towers)
        print(f"{name:<{width}}  {cls.summary}  [{towers}]")
        for opt, desc in cls.options.items():
            print(f"{'':<{width}}    --option {opt}=...  {desc}")
    return 0


def cmd_explain(args) -> int:
    from tqdm import tqdm

    from .adapters import load_model
    from .api import ExplainRequest, explain_request
    from .explanation import Explanation
    from .files import staged_dir
    from .images import load_image
    from .viz import pages

    options = dict(_parse_option(o) for o in args.option or [])
    # everything is checked before the model loads: prompts, method, options, target, images
    request = ExplainRequest.build(
        _read_texts(args), args.method, target=args.target, resize=args.resize, options=options
    )
    if not args.images:
        raise InputError("no images given")
    images = [load_image(p, max_pixels=args.max_pixels) for p in args.images]
    adapter = load_model(args.model, device=args.device)
    parts = []
    with tqdm(total=len(images), desc="explaining", unit="image", disable=len(images) < 2 or None) as bar:
        for start in range(0, len(images), args.batch_size):
            batch = images[start : start + args.batch_size]
            parts.append(explain_request(adapter, batch, request))
            bar.update(len(batch))
    ex = Explanation.concat(parts)
    labels = [str(p) for p in args.images]
    out = Path(args.out)
    with staged_dir(out) as stage:
        results = pages.write_folder(ex, labels, stage, model=adapter.name, mode=args.normalise, final=out)
    print(f"wrote {len(results['pairs'])} pair(s) to {args.out}/ (index.html, results.json)")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo, summary_table

    print(f"cliplens demo: scene {args.seed} of the shapes world, model {args.model}")
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    rows = run_demo(args.out, seed=args.seed, model=args.model, methods=methods)
    print()
    print(summary_table(rows))
    print(f"\nopen {args.out}/index.html")
    return 0


def cmd_app(args) -> int:
    try:
        from .app.server import serve
    except ImportError as exc:  # the optional extra is not installed
        raise InputError(
            f"the app needs the optional extra: pip install 'cliplens[app]' (missing: {exc.name})"
        ) from None
    serve(args.model, host=args.host, port=args.port, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cliplens",
        description="Explain why a CLIP-family model matches an image with a text: image heatmaps, "
        "token scores and faithfulness numbers.",
    )
    parser.add_argument("--version", action="version", version=f"cliplens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "explain",
        help="explain image-text similarity for images x prompts",
        description="Explain every (image, prompt) pair: writes an overlay PNG per pair, index.html "
        "(overlays and token heatmaps) and results.json (logits, probabilities, raw maps, token scores).",
    )
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ... any PIL format)")
    p.add_argument("--text", "-t", action="append", help="a prompt; repeat for several")
    p.add_argument("--texts-file", help="a UTF-8 file with one prompt per line")
    p.add_argument(
        "--model",
        "-m",
        default=DEFAULT_MODEL,
        help=f"hub name, local checkpoint directory, or 'shapes' (the embedded model). Default: {DEFAULT_MODEL}",
    )
    p.add_argument("--method", default="chefer", help="attribution method (see `cliplens methods`). Default: chefer")
    p.add_argument(
        "--target",
        default="logit",
        help="what to explain: logit (scaled cosine), probability (softmax over the prompts), "
        "contrast:OTHER (logit minus the logit of prompt OTHER, an index or text). Default: logit",
    )
    p.add_argument("--option", "-o", action="append", help="method option KEY=VALUE, e.g. start_layer=0")
    p.add_argument("--out", default="cliplens-out", help="output folder (created). Default: cliplens-out")
    p.add_argument(
        "--resize",
        choices=["model", "full"],
        default="model",
        help="model: the checkpoint's resize + centre crop; full: keep the whole image. Default: model",
    )
    p.add_argument(
        "--normalise",
        choices=["minmax", "positive", "signed"],
        default="minmax",
        help="display scaling of the overlays (raw values are kept in results.json): minmax, positive "
        "(negative parts cut), signed (diverging colours around zero). Default: minmax",
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass. Default: 8")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse images above this many pixels")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda. Default: where the model loads (CPU)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "demo",
        help="explain a shapes-world scene with every method (offline, embedded model)",
        description="Draw a scene of the procedural shapes world, explain each object's caption and one "
        "absent caption with every registered method using the embedded model, write index.html and PNGs, "
        "and print where each method's peak lands.",
    )
    p.add_argument("--out", default="cliplens-demo", help="output folder. Default: cliplens-demo")
    p.add_argument("--seed", type=int, default=0, help="which scene to draw. Default: 0")
    p.add_argument("--model", default="shapes", help="model to explain. Default: shapes (embedded)")
    p.add_argument("--methods", default=None, help="comma-separated methods. Default: all")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "app",
        help="a local web app: upload an image or pick a scene, compare methods (needs cliplens[app])",
        description="Serve a local web page to explain images with several methods side by side. The model "
        "loads once; results are kept in a temporary folder removed on exit.",
    )
    p.add_argument("--model", "-m", default="shapes", help="model to explain. Default: shapes (embedded, offline)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind. Default: 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port. Default: 8765")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda. Default: where the model loads (CPU)")
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("methods", help="list attribution methods", description="List the registered methods.")
    p.set_defaults(func=cmd_methods)
    _add_evaluate_parser(sub)
    return parser


def _add_evaluate_parser(sub) -> None:
    """``cliplens evaluate``: its flags, generated from the evaluation's config, and the command
    live in :mod:`cliplens.eval.cli`."""
    from .eval.cli import add_evaluate_parser

    add_evaluate_parser(sub)


def _quiet_libraries() -> None:
    """The CLI owns the terminal: no weight-loading progress bars from transformers."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "batch_size", 1) < 1:
        parser.error("--batch-size must be at least 1")

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"cliplens: warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except CliplensError as exc:
        print(f"cliplens: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cliplens: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
