"""Command line: thin wrappers around the public API."""

from __future__ import annotations

import argparse
import contextlib
import os
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


def check_device(device: str | None):
    """``device`` as a torch device, checked before the model loads: a one-line InputError for
    an unknown name or a device this torch build or machine does not have."""
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise InputError(f"--device {device}: {build}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, ValueError, AssertionError):
            raise InputError(f"--device {device}: not available in this torch build") from None
    return dev


DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    """The torch dtype of a --dtype name (checked: :func:`check_dtype`)."""
    import torch

    return getattr(torch, check_dtype(name))


def check_dtype(name: str) -> str:
    """``name`` if it is one of :data:`DTYPES`, else a one-line InputError (exit 2)."""
    if name not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return name


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's CPU thread count set to ``threads`` for the block (None: left alone), restored after."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cmd_methods(args) -> int:
    from .methods import REGISTRY
    from .methods.papers import paper_note

    width = max(len(n) for n in REGISTRY)
    for name, cls in REGISTRY.items():
        if name.startswith("_"):
            continue
        towers = "+".join(cls.towers)
        print(f"{name:<{width}}  {cls.summary}  [{towers}]")
        note = paper_note(name)
        if note:
            print(f"{'':<{width}}    paper: {note}")
        if cls.fusion:
            print(f"{'':<{width}}    fusion models (BLIP, ViLT, ...): {cls.fusion_summary or cls.summary}")
        for opt, desc in cls.options.items():
            print(f"{'':<{width}}    --option {opt}=...  {desc}")
    return 0


def cmd_explain(args) -> int:
    from .files import reserve_output

    saved = os.environ.get("CLIPLENS_MAX_TOKENS")
    try:
        with reserve_output(args.out, overwrite=args.overwrite):  # checked and locked before any work
            return _explain(args)
    finally:  # --max-tokens is set for this run only
        if saved is None:
            os.environ.pop("CLIPLENS_MAX_TOKENS", None)
        else:
            os.environ["CLIPLENS_MAX_TOKENS"] = saved


def _explain(args) -> int:
    from tqdm import tqdm

    from .adapters import load_model
    from .api import ExplainRequest, explain_request
    from .explanation import Explanation
    from .files import staged_dir
    from .images import load_image
    from .viz import pages

    device = check_device(args.device)
    dtype = torch_dtype(args.dtype)
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
    if args.max_pixels is not None and args.max_pixels < 1:
        raise InputError(f"--max-pixels must be at least 1, got {args.max_pixels}")
    if args.overlay_size < 0:
        raise InputError(f"--overlay-size must be 0 (full size) or positive, got {args.overlay_size}")
    if args.max_tokens is not None:
        if args.max_tokens < 1:
            raise InputError(f"--max-tokens must be at least 1, got {args.max_tokens}")
        os.environ["CLIPLENS_MAX_TOKENS"] = str(args.max_tokens)  # read by the resize recipes
    options = dict(_parse_option(o) for o in args.option or [])
    # everything is checked before the model loads: prompts, method, options, target, images
    request = ExplainRequest.build(
        _read_texts(args),
        args.method,
        target=args.target,
        resize=args.resize,
        options=options,
        max_pairs=args.max_pairs,
    )
    if not args.images:
        raise InputError("no images given")
    images = [load_image(p, max_pixels=args.max_pixels) for p in args.images]
    with torch_threads(args.threads):
        adapter = load_model(args.model, device=device, dtype=dtype)
        parts = []
        with tqdm(total=len(images), desc="explaining", unit="image", disable=len(images) < 2 or None) as bar:
            for start in range(0, len(images), args.batch_size):
                batch = images[start : start + args.batch_size]
                parts.append(explain_request(adapter, batch, request))
                bar.update(len(batch))
    ex = Explanation.concat(parts)
    labels = [str(p) for p in args.images]
    out = Path(args.out)
    with staged_dir(out, overwrite=args.overwrite) as stage:
        results = pages.write_folder(
            ex,
            labels,
            stage,
            model=adapter.name,
            mode=args.normalise,
            final=out,
            max_side=args.overlay_size or None,
            scale=args.scale,
        )
    print(f"wrote {len(results['pairs'])} pair(s) to {args.out}/ (index.html, results.json)")
    return 0


def cmd_explain_dataset(args) -> int:
    from .scale import ScaleJob, explain_dataset

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    job = ScaleJob(
        model=args.model,
        dataset=args.dataset,
        texts=tuple(_read_texts(args)),
        methods=methods,
        target=args.target,
        resize=args.resize,
        dtype=args.dtype,
        limit=args.limit,
    )
    with torch_threads(args.threads):
        done = explain_dataset(
            job,
            args.out,
            engine=args.engine,
            batch_size=args.batch_size,
            device=args.device,
            restart=args.restart,
            ray_address=args.ray_address,
            workers=args.workers,
        )
    print(
        f"{done.items_new} item(s) explained this run, {done.items_done} in {done.out}/data "
        f"({done.rows_per_item} record(s) per item: prompts x methods)"
    )
    return 0


def _add_explain_dataset_parser(sub) -> None:
    p = sub.add_parser(
        "explain-dataset",
        help="explain every image of a dataset x prompts x methods into Parquet (resumable; local or Ray)",
        description="Explain every (image, prompt, method) of a dataset and write the raw grid maps, token "
        "scores, logits, probabilities and target values as a Parquet dataset under --out/data "
        "(partitioned by method and part). Rerun the same command to resume; see docs/scale.md.",
    )
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"as for explain. Default: {DEFAULT_MODEL}")
    p.add_argument(
        "--dataset",
        required=True,
        help="a folder of images (every image file under it; its relative path is the item id) or KIND:PATH "
        "as for evaluate (e.g. shapes:DIR, coco:FILE.json)",
    )
    p.add_argument("--text", "-t", action="append", help="a prompt; repeat for several")
    p.add_argument("--texts-file", help="a UTF-8 file with one prompt per line")
    p.add_argument("--methods", default="chefer", help="comma-separated methods. Default: chefer")
    p.add_argument("--target", default="logit", help="as for explain. Default: logit")
    p.add_argument("--resize", choices=["model", "full"], default="model", help="as for explain")
    p.add_argument("--out", required=True, help="output folder (created; resumed when it holds this job)")
    p.add_argument("--restart", action="store_true", help="discard what --out holds of an earlier job")
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch and part. Default: 8")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto. Default: auto")
    p.add_argument(
        "--dtype", default="float32", metavar="DTYPE", help="weights' dtype: float32, bfloat16 or float16. Default: float32"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (local engine)")
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="local or ray. Default: local")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (auto: the running one)")
    p.add_argument("--workers", type=int, default=2, help="Ray actors, one model each. Default: 2")
    p.set_defaults(func=cmd_explain_dataset)


def cmd_demo(args) -> int:
    from .demo import run_demo, summary_table
    from .files import check_output_dir

    if args.seed < 0:
        raise InputError(f"--seed must be 0 or more, got {args.seed}")
    dtype = torch_dtype(args.dtype)
    device = check_device(args.device)
    check_output_dir(args.out)
    print(f"cliplens demo: scene {args.seed} of the shapes world, model {args.model}")
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    fusion = None if args.fusion_model.lower() == "none" else args.fusion_model
    rows = run_demo(
        args.out, seed=args.seed, model=args.model, methods=methods, device=device, dtype=dtype, fusion_model=fusion
    )
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
        help="what to explain: logit (scaled cosine; fusion models: the match log-odds), probability (softmax "
        "over the prompts; sigmoid for SigLIP and fusion models), contrast:OTHER (logit minus the logit of prompt OTHER: #K for the prompt at index K, or the "
        "prompt's exact text; a bare number is an index unless a prompt is exactly that text). Default: logit",
    )
    p.add_argument("--option", "-o", action="append", help="method option KEY=VALUE, e.g. start_layer=0")
    p.add_argument("--out", default="cliplens-out", help="output folder (created). Default: cliplens-out")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the contents of a non-empty --out that is not a cliplens output "
        "(an earlier cliplens output is always replaced as a whole)",
    )
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
    p.add_argument(
        "--scale",
        choices=["pair", "image"],
        default="pair",
        help="the overlays' colour scale: per pair, or shared by every prompt of an image (an absent "
        "object's map then no longer looks as hot as a present one's). Default: pair",
    )
    p.add_argument(
        "--overlay-size",
        type=int,
        default=1024,
        help="longest side of the overlay PNGs in pixels; 0: the source image's full size. Default: 1024",
    )
    p.add_argument("--batch-size", type=int, default=8, help="images read and explained per step. Default: 8")
    p.add_argument(
        "--max-pairs",
        type=int,
        default=None,
        help="at most this many (image, prompt) pairs per forward/backward pass: memory is bounded by "
        "it, the numbers are the same. Default: 128",
    )
    p.add_argument("--max-pixels", type=int, default=None, help="refuse images above this many pixels")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="with --resize full, refuse an image that needs more patch tokens than this "
        "(default: CLIPLENS_MAX_TOKENS or 4096)",
    )
    p.add_argument("--device", default=None, help="torch device, e.g. cuda. Default: where the model loads (CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for the run. Default: torch's own")
    p.add_argument(
        "--dtype",
        default="float32",
        metavar="DTYPE",
        help="weights' dtype: float32, bfloat16 or float16 (half the memory; maps and scores are returned in "
        "float). Default: float32",
    )
    p.set_defaults(func=cmd_explain)

    _add_explain_dataset_parser(sub)

    p = sub.add_parser(
        "demo",
        help="explain a shapes-world scene with every method (offline, embedded model)",
        description="Draw a scene of the procedural shapes world, explain each object's caption and one "
        "absent caption with every registered method using the embedded model, then with the embedded "
        "shapes BLIP (a model that scores image and text together: chefer's bi-modal rules, raw cross-"
        "attention, LAVIS's Grad-CAM), write index.html and PNGs, and print where each method's peak lands.",
    )
    p.add_argument("--out", default="cliplens-demo", help="output folder. Default: cliplens-demo")
    p.add_argument("--seed", type=int, default=0, help="which scene to draw. Default: 0")
    p.add_argument("--model", default="shapes", help="model to explain. Default: shapes (embedded)")
    p.add_argument("--methods", default=None, help="comma-separated methods. Default: all")
    p.add_argument(
        "--fusion-model",
        default="shapes-blip",
        help="a second model, one that scores image and text together, shown after the first; 'none' for none. "
        "Default: shapes-blip (embedded)",
    )
    p.add_argument("--device", default=None, help="torch device, e.g. cuda. Default: where the model loads (CPU)")
    p.add_argument(
        "--dtype",
        default="float32",
        metavar="DTYPE",
        help="weights' dtype: float32, bfloat16 or float16 (maps and scores are returned in float). Default: float32",
    )
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` (staging folders, locks) runs."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal

    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        return _main(argv)
    except CliplensError as exc:
        print(f"cliplens: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print("cliplens: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("cliplens: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
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
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
