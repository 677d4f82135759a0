"""The per-phrase pointing game on the shapes world (cliplens.eval.phrases): prints the
markdown table that docs/evaluation.md carries.

    python scripts/eval_phrases.py                      # 100 scenes, the shipped shapes model
    python scripts/eval_phrases.py --scenes 20 --first-order chefer,legrad
    python scripts/eval_phrases.py --model ./clip-checkpoint --mosaics imagenet:PATH --scenes 500
"""

from __future__ import annotations

import argparse
import time

import torch

from cliplens.eval.phrases import FIRST_ORDER_METHODS, INTERACTION_METHODS, evaluate_phrases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--scenes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--interaction", default=",".join(INTERACTION_METHODS))
    ap.add_argument("--first-order", default=",".join(FIRST_ORDER_METHODS))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument(
        "--mosaics", default="", metavar="KIND:PATH",
        help="the 2x2 mosaic protocol of exCLIP/FIxLIP on this labelled dataset (--scenes mosaics)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    split = lambda s: tuple(m for m in s.split(",") if m)  # noqa: E731
    t0 = time.perf_counter()
    from cliplens import load_model
    from cliplens.eval.phrases import mosaic_items

    items = mosaic_items(args.mosaics, args.scenes, seed=args.seed) if args.mosaics else None

    res = evaluate_phrases(
        load_model(args.model, device=args.device),
        args.scenes,
        seed=args.seed,
        interaction_methods=split(args.interaction),
        first_order=split(args.first_order),
        progress=True,
        items=items,
    )
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{res.n_scenes} scenes, {res.n_phrases} named objects, seed {args.seed}, "
          f"{time.perf_counter() - t0:.0f} s, {where}")
    print(res.markdown())


if __name__ == "__main__":
    main()
