"""Reader of OpenImages V7 point labels (``*point-labels*.csv``, ``*class-descriptions*.csv``).

The conventions every reader follows: :mod:`cliplens.eval.datasets`."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .base import EvalDataset, EvalItem, fail, find_image, open_rgb, require_dir, require_file

__all__ = ["read_openimages_points"]


def _read_class_descriptions(kind: str, path: Path) -> dict[str, str]:
    """``LabelName,DisplayName`` rows (the v7 file has that header; older ones have none)."""
    out: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for k, row in enumerate(csv.reader(fh)):
                if not row:
                    continue
                if len(row) < 2:
                    raise fail(kind, f"{path} line {k + 1}: expected LabelName,DisplayName")
                if k == 0 and row[0].strip() == "LabelName":
                    continue
                out[row[0].strip()] = row[1].strip()
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise fail(kind, f"cannot read class descriptions {path}: {e}") from None
    return out


def read_openimages_points(
    path,
    *,
    limit: int | None = None,
    images_dir: str | Path | None = None,
    class_descriptions: str | Path | None = None,
) -> EvalDataset:
    """OpenImages V7 point labels (Benenson & Ferrari 2022), the p-mIoU data of GEM and LeGrad.

    ``PATH`` is the point-label CSV (``oidv7-val-annotations-point-labels.csv``) or a folder
    holding exactly one ``*point-labels*.csv`` (or ``points.csv``). Columns used: ``ImageId``,
    ``X``, ``Y`` (normalised to [0, 1]), ``Label`` (``LabelName`` accepted) and
    ``EstimatedYesNo`` (``yes`` / ``no`` / ``unsure``); the others (``Source``, votes,
    ``TextLabel``) are ignored. Display names come from ``class_descriptions`` or the one
    ``*class-descriptions*.csv`` next to the CSV (else the label id is the name); ids that share
    a display name are merged. Images: ``images_dir`` or ``images/`` next to the CSV, named
    ``<ImageId>.jpg``.

    Per item, ``points[name] = (yes, no)`` in pixels (``X * width``, ``Y * height``); unsure
    points are dropped and counted in ``extra["unsure"]``. ``labels`` lists the classes with
    at least one "yes" point (the classes present, one map each in the protocol) in CSV order;
    ``points`` also keeps classes with only "no" points. Items are sorted by ImageId. The CSV is
    read (once) on the first iteration, as rows of one image may be anywhere in it.
    """
    kind = "openimages-points"
    p = Path(path)
    if p.is_dir():
        root = p
        found = sorted(q for q in p.glob("*point-labels*.csv") if q.is_file())
        if not found and (p / "points.csv").is_file():
            found = [p / "points.csv"]
        if len(found) != 1:
            what = (
                "no *point-labels*.csv"
                if not found
                else f"several point CSVs ({', '.join(q.name for q in found)})"
            )
            raise fail(kind, f"{what} in {p}: pass the CSV itself")
        csv_path = found[0]
    else:
        require_file(kind, p, "point-label CSV")
        csv_path, root = p, p.parent
    img_dir = Path(images_dir) if images_dir is not None else root / "images"
    require_dir(kind, img_dir, "image folder")
    if class_descriptions is not None:
        require_file(kind, Path(class_descriptions), "class descriptions")
        names = _read_class_descriptions(kind, Path(class_descriptions))
    else:
        desc = sorted(q for q in root.glob("*class-descriptions*.csv") if q.is_file())
        if len(desc) > 1:
            raise fail(kind, f"several class-description CSVs in {root}: pass class_descriptions=")
        names = _read_class_descriptions(kind, desc[0]) if desc else {}
    try:
        with open(csv_path, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), None)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise fail(kind, f"cannot read {csv_path}: {e}") from None
    header = [h.strip() for h in header or []]
    label_col = "Label" if "Label" in header else "LabelName"
    missing = [c for c in ("ImageId", "X", "Y", label_col, "EstimatedYesNo") if c not in header]
    if missing:
        raise fail(kind, f"{csv_path} lacks the column(s) {', '.join(missing)}")

    cache: dict[str, Any] = {}

    def load() -> dict[str, dict[str, list]]:
        if "rows" in cache:
            return cache["rows"]
        per_image: dict[str, dict[str, list]] = {}
        try:
            with open(csv_path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh, skipinitialspace=True)
                for row in reader:
                    line = reader.line_num
                    try:
                        image_id = row["ImageId"].strip()
                        name = names.get(row[label_col].strip(), row[label_col].strip())
                        x, y = float(row["X"]), float(row["Y"])
                        answer = row["EstimatedYesNo"].strip().lower()
                    except (KeyError, ValueError, AttributeError) as e:
                        raise fail(kind, f"{csv_path} line {line}: malformed row ({e})") from None
                    if answer not in ("yes", "no", "unsure"):
                        raise fail(
                            kind, f"{csv_path} line {line}: EstimatedYesNo is {answer!r}, not yes/no/unsure"
                        )
                    if not (math.isfinite(x) and math.isfinite(y)):
                        raise fail(kind, f"{csv_path} line {line}: non-finite point")
                    cls = per_image.setdefault(image_id, {}).setdefault(name, [[], [], 0])
                    if answer == "yes":
                        cls[0].append((x, y))
                    elif answer == "no":
                        cls[1].append((x, y))
                    else:
                        cls[2] += 1
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise fail(kind, f"cannot read {csv_path}: {e}") from None
        cache["rows"] = per_image
        return per_image

    def items() -> Iterator[EvalItem]:
        per_image = load()
        for image_id in sorted(per_image):
            image_path = find_image(img_dir, image_id, (".jpg", ".jpeg", ".png"))
            if image_path is None:
                raise fail(kind, f"image not found: {img_dir / (image_id + '.jpg')}")
            image = open_rgb(kind, image_path)
            scale = np.array(image.size, dtype=np.float64)
            points: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            unsure: dict[str, int] = {}
            for name, (yes, no, n_unsure) in per_image[image_id].items():
                points[name] = (
                    np.asarray(yes, dtype=np.float64).reshape(-1, 2) * scale,
                    np.asarray(no, dtype=np.float64).reshape(-1, 2) * scale,
                )
                if n_unsure:
                    unsure[name] = n_unsure
            yield EvalItem(
                id=image_id,
                image=image,
                masks=None,
                points=points,
                labels=[name for name, (yes, _) in points.items() if len(yes)],
                extra={"unsure": unsure, "file": str(image_path)},
            )

    return EvalDataset(kind, csv_path, items, limit=limit)
