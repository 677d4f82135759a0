"""Reader of the cliplens shapes world (:mod:`cliplens.worlds.shapes`).

The conventions every reader follows: :mod:`cliplens.eval.datasets`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .base import EvalDataset, EvalItem, fail, open_rgb, read_mask, require_dir, require_file

__all__ = ["read_shapes"]


def read_shapes(path, *, limit: int | None = None) -> EvalDataset:
    """The cliplens shapes world (written by :func:`cliplens.worlds.shapes.write_dataset`).

    ``PATH/dataset.json`` must say ``"kind": "shapes"``; ``PATH/index.jsonl`` holds one scene
    per line in file order. Masks (mode "L", 0/255) are keyed by object label; two objects with
    one label would be merged (the world never draws the same colour and shape twice). The
    record's other fields (``captions``, ``absent``, ``compositional``, ``objects`` with bbox
    and area, ``seed``, ...) go to ``extra``.
    """
    kind = "shapes"
    root = Path(path)
    require_dir(kind, root)
    meta_path, index_path = root / "dataset.json", root / "index.jsonl"
    require_file(kind, meta_path)
    require_file(kind, index_path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise fail(kind, f"cannot read {meta_path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("kind") != "shapes":
        found = meta.get("kind") if isinstance(meta, dict) else None
        raise fail(kind, f"{meta_path} does not describe a shapes dataset (kind is {found!r})")
    try:
        lines = index_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise fail(kind, f"cannot read {index_path}: {e}") from None
    records = [(no, line) for no, line in enumerate(lines, start=1) if line.strip()]

    def items() -> Iterator[EvalItem]:
        for line_no, line in records:
            try:
                rec = json.loads(line)
                scene_id = str(rec["id"])
                image_rel = rec["image"]
                mask_refs = [(str(o["label"]), o["mask"]) for o in rec.get("objects", [])]
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise fail(kind, f"{index_path} line {line_no}: malformed record ({e})") from None
            image = open_rgb(kind, root / image_rel)
            if "width" in rec and "height" in rec and image.size != (rec["width"], rec["height"]):
                got, want = "{}x{}".format(*image.size), f"{rec['width']}x{rec['height']}"
                raise fail(kind, f"{image_rel} is {got}, index.jsonl says {want}")
            masks: dict[str, np.ndarray] = {}
            for label, mask_rel in mask_refs:
                m = read_mask(kind, root / mask_rel, image.size)
                masks[label] = masks[label] | m if label in masks else m
            extra = {k: v for k, v in rec.items() if k not in ("id", "image")}
            extra["meta"] = meta
            yield EvalItem(
                id=scene_id, image=image, masks=masks, points=None, labels=list(masks), extra=extra
            )

    return EvalDataset(kind, root, items, limit=limit, size=len(records))
