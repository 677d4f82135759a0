"""One dataset-scale job: what it asks (:class:`ScaleJob`), the items it covers, and the pure
function that turns a batch of items into record rows (the same for every engine).

A *record* is one (item, prompt, method): the raw grid map, token scores, logit, probability and
target value. Rows are columns of plain Python/numpy values (:func:`explain_rows`); the Parquet
schema lives in :mod:`cliplens.scale.store`. Nothing here imports pyarrow or ray.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import DatasetError, InputError

#: bumped when the rows' meaning changes (part of the digest: old folders are refused)
FORMAT = "cliplens-scale/1"
DTYPES = ("float32", "bfloat16", "float16")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ScaleJob:
    """Everything that decides the records' values. Its :meth:`digest` is stored beside the data;
    a resumed job must have the same one. Batch size, engine and device only decide how the work
    is done, not what it gives, and are left out (a job started on one device may finish on
    another; values then agree to that device's float tolerance)."""

    model: str
    dataset: str
    texts: tuple[str, ...]
    methods: tuple[str, ...]
    target: str = "logit"
    resize: str = "model"
    dtype: str = "float32"
    limit: int | None = None

    def requests(self) -> list:
        """One validated :class:`~cliplens.api.ExplainRequest` per method (no model loads)."""
        from ..api import ExplainRequest

        if not self.methods:
            raise InputError("no methods given (--methods chefer,legrad)")
        if len(set(self.methods)) != len(self.methods):
            raise InputError(f"a method is named twice in --methods {','.join(self.methods)}")
        if self.dtype not in DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.limit is not None and self.limit < 0:
            raise InputError(f"--limit must be 0 or more, got {self.limit}")
        reqs = [
            ExplainRequest.build(list(self.texts), m, target=self.target, resize=self.resize)
            for m in self.methods
        ]
        return reqs

    def to_dict(self) -> dict:
        d = asdict(self)
        d["texts"], d["methods"] = list(self.texts), list(self.methods)
        d["format"] = FORMAT
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def torch_dtype(self):
        import torch

        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]


# ----------------------------------------------------------------------------- items


def list_items(spec: str, limit: int | None = None) -> Iterator[dict]:
    """The job's items in a deterministic order, lazily: dicts with ``index``, ``id`` and
    either ``path`` (a plain folder of images: every image file under it, sorted by relative
    path, which is the id) or ``image`` (a PIL image from ``open_dataset("KIND:PATH")``).
    Ids must be unique (they are the resume key)."""
    root = Path(spec).expanduser()
    seen: set[str] = set()

    def check(item_id: str) -> str:
        if item_id in seen:
            raise DatasetError(f"{spec}: two items have the id {item_id!r}; ids must be unique to resume")
        seen.add(item_id)
        return item_id

    if root.is_dir():
        files = sorted(
            p
            for p in root.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not _hidden(p, root)
        )
        if not files:
            raise DatasetError(f"{spec}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        for i, p in enumerate(files[:limit] if limit is not None else files):
            yield {"index": i, "id": check(p.relative_to(root).as_posix()), "path": str(p)}
        return
    if ":" not in spec:
        raise DatasetError(f"{spec}: not a folder of images, and not a dataset given as KIND:PATH")
    from ..eval.datasets import open_dataset

    for i, item in enumerate(open_dataset(spec, limit=limit)):
        yield {"index": i, "id": check(str(item.id)), "image": item.image}


def check_dataset(spec: str) -> None:
    """Fail early (one line) on a dataset that cannot be opened, before a model loads."""
    root = Path(spec).expanduser()
    if root.is_dir():
        return
    if ":" not in spec:
        raise DatasetError(f"{spec}: not a folder of images, and not a dataset given as KIND:PATH")
    from ..eval.datasets import open_dataset

    open_dataset(spec, limit=0)


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def item_image(item: dict):
    """The RGB PIL image of an item row (a path, a PIL image, or PNG bytes from a Ray block)."""
    from PIL import Image

    from ..images import load_image

    if item.get("path"):
        return load_image(item["path"])
    if item.get("png") is not None and len(item["png"]):
        return Image.open(io.BytesIO(item["png"])).convert("RGB")
    return item["image"].convert("RGB")


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ----------------------------------------------------------------------------- records

COLUMNS = (
    "method",
    "item_index",
    "item_id",
    "prompt_index",
    "prompt",
    "image_width",
    "image_height",
    "grid_h",
    "grid_w",
    "grid_map",
    "tokens",
    "token_scores",
    "logit",
    "probability",
    "target",
)


def explain_rows(adapter, requests: list, items: list[dict]) -> dict[str, list]:
    """The record rows of ``items`` (one batch) for every request: a dict of equal-length
    column lists, method-major, then item, then prompt. Maps and token scores in float32
    whatever the model's dtype."""
    from ..api import explain_request

    images = [item_image(it) for it in items]
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    for req in requests:
        ex = explain_request(adapter, images, req)
        P = len(ex.texts)
        for b, it in enumerate(items):
            geom = ex.geometries[b]
            for p in range(P):
                if ex.image_maps is not None:
                    grid = np.asarray(ex.grid_map(b, p), dtype=np.float32)
                    gh, gw = grid.shape
                    flat = grid.ravel()
                else:
                    gh = gw = None
                    flat = None
                n = len(ex.tokens[p])
                scores = (
                    None
                    if ex.token_scores is None
                    else np.asarray(ex.token_scores[b, p, :n], dtype=np.float32)
                )
                cols["method"].append(ex.method)
                cols["item_index"].append(int(it["index"]))
                cols["item_id"].append(str(it["id"]))
                cols["prompt_index"].append(p)
                cols["prompt"].append(ex.texts[p])
                cols["image_width"].append(int(geom.width))
                cols["image_height"].append(int(geom.height))
                cols["grid_h"].append(gh)
                cols["grid_w"].append(gw)
                cols["grid_map"].append(flat)
                cols["tokens"].append(list(ex.tokens[p]))
                cols["token_scores"].append(scores)
                cols["logit"].append(float(ex.logits[b, p]))
                cols["probability"].append(float(ex.probs[b, p]))
                cols["target"].append(float(ex.target_values[b, p]))
    return cols
