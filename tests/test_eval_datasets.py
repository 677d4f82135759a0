"""Dataset readers, each on a small fixture written here in that dataset's exact format."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliplens.errors import CliplensError
from cliplens.eval.datasets import (
    DATASET_KINDS,
    DatasetError,
    EvalItem,
    decode_rle,
    open_dataset,
    rasterize_polygons,
    rle_string_to_counts,
)


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save_rgb(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode="RGB").save(path)


def _save_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


# ----------------------------------------------------------------------------- dispatcher


def test_dispatcher_errors():
    with pytest.raises(DatasetError, match="KIND:PATH") as e:
        open_dataset("no-colon-here")
    _one_line(e)
    with pytest.raises(DatasetError, match="unknown dataset kind 'pascal'") as e:
        open_dataset("pascal:/tmp/x")
    assert all(k in str(e.value) for k in DATASET_KINDS)
    with pytest.raises(DatasetError, match="no path"):
        open_dataset("folder:")
    assert issubclass(DatasetError, CliplensError)


def test_missing_paths(tmp_path):
    for spec in (
        f"imagenet-seg:{tmp_path / 'gtsegs_ijcv.mat'}",
        f"imagenet-s:{tmp_path / 'nope'}",
        f"openimages-points:{tmp_path / 'points.csv'}",
        f"coco:{tmp_path / 'annotations.json'}",
        f"folder:{tmp_path / 'nope'}",
        f"shapes:{tmp_path / 'nope'}",
    ):
        with pytest.raises(DatasetError, match="not found") as e:
            open_dataset(spec)
        _one_line(e)


# ----------------------------------------------------------------------------- imagenet-seg

IMSEG_SIZES = [(5, 7), (6, 4), (3, 3)]  # (H, W), not square on purpose


def _write_imagenet_seg(path: Path, h5py, n: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    """gtsegs_ijcv.mat as MATLAB v7.3 writes it: value/img and value/gt are (N, 1) object
    references; images are stored transposed (3, W, H); each gt reference points to a 1 x 1
    cell (a dataset of one reference) that points to the (W, H) mask; value/id points to
    UTF-16 code units of the synset."""
    truth = []
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        img = f.create_dataset("value/img", (n, 1), dtype=h5py.ref_dtype)
        gt = f.create_dataset("value/gt", (n, 1), dtype=h5py.ref_dtype)
        ids = f.create_dataset("value/id", (n, 1), dtype=h5py.ref_dtype)
        for i in range(n):
            h, w = IMSEG_SIZES[i % len(IMSEG_SIZES)]
            hwc = _rgb(h, w, i)
            mask = np.zeros((h, w), dtype=bool)
            mask[1:, : w // 2 + 1] = True
            mask[0, w - 1] = True  # a corner pixel that catches a transposition
            truth.append((hwc, mask))
            d_img = refs.create_dataset(f"img{i}", data=np.transpose(hwc, (2, 1, 0)))
            d_mask = refs.create_dataset(f"mask{i}", data=mask.T.astype(np.uint8))
            cell = refs.create_dataset(f"cell{i}", (1, 1), dtype=h5py.ref_dtype)
            cell[0, 0] = d_mask.ref
            synset = f"n0144353{i}"
            d_id = refs.create_dataset(f"id{i}", data=np.array([ord(c) for c in synset], np.uint16)[:, None])
            img[i, 0] = d_img.ref
            gt[i, 0] = cell.ref
            ids[i, 0] = d_id.ref
    return truth


def test_imagenet_seg_reads_exact_layout(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "gtsegs_ijcv.mat"
    truth = _write_imagenet_seg(path, h5py)
    ds = open_dataset(f"imagenet-seg:{path}")
    assert ds.size == 3
    items = list(ds)
    assert [it.id for it in items] == ["00000", "00001", "00002"]
    for it, (hwc, mask) in zip(items, truth):
        assert isinstance(it, EvalItem)
        assert it.image.mode == "RGB" and it.image.size == (hwc.shape[1], hwc.shape[0])
        assert np.array_equal(np.asarray(it.image), hwc)
        assert it.labels == ["object"] and it.points is None
        assert it.masks["object"].dtype == bool and np.array_equal(it.masks["object"], mask)
    assert items[1].extra["synset"] == "n01443531"
    assert [it.id for it in open_dataset(f"imagenet-seg:{path}", limit=2)] == ["00000", "00001"]


def test_imagenet_seg_corrupt_files(tmp_path):
    h5py = pytest.importorskip("h5py")
    bad = tmp_path / "gtsegs_ijcv.mat"
    bad.write_bytes(b"MATLAB 5.0 MAT-file, not HDF5 at all")
    with pytest.raises(DatasetError, match="HDF5") as e:
        open_dataset(f"imagenet-seg:{bad}")
    _one_line(e)
    other = tmp_path / "other.mat"
    with h5py.File(other, "w") as f:
        f.create_dataset("value/x", data=np.zeros(3))
    with pytest.raises(DatasetError, match="value/img"):
        open_dataset(f"imagenet-seg:{other}")
    broken = tmp_path / "broken.mat"
    with h5py.File(broken, "w") as f:
        img = f.create_dataset("value/img", (1, 1), dtype=h5py.ref_dtype)
        f.create_dataset("value/gt", (1, 1), dtype=h5py.ref_dtype)  # null references
        img[0, 0] = f.create_dataset("i0", data=np.zeros((3, 4, 5), np.uint8)).ref
    ds = open_dataset(f"imagenet-seg:{broken}")
    with pytest.raises(DatasetError, match="item 0"):
        list(ds)


# ----------------------------------------------------------------------------- imagenet-s


def _encode_ids(ids: np.ndarray) -> np.ndarray:
    """ImageNet-S stores the class id as R + 256 * G."""
    out = np.zeros(ids.shape + (3,), dtype=np.uint8)
    out[..., 0] = ids % 256
    out[..., 1] = ids // 256
    return out


def _write_imagenet_s(root: Path) -> dict:
    ids_a = np.zeros((6, 8), dtype=np.int64)
    ids_a[1:3, 1:4] = 1
    ids_a[3:6, 4:8] = 300  # R=44, G=1: needs the G channel
    ids_a[0, 7] = 1000  # ignore
    ids_b = np.zeros((4, 5), dtype=np.int64)
    ids_b[2:, 2:] = 2
    files = [
        ("n01443537", "ILSVRC2012_val_00000001", ids_a),
        ("n01491361", "ILSVRC2012_val_00000002", ids_b),
    ]
    for wnid, name, ids in files:
        _save_rgb(root / "validation" / wnid / f"{name}.JPEG", _rgb(*ids.shape, 7))
        _save_rgb(root / "validation-segmentation" / wnid / f"{name}.png", _encode_ids(ids))
    return {"a": ids_a, "b": ids_b}


def test_imagenet_s_decodes_class_ids(tmp_path):
    ids = _write_imagenet_s(tmp_path)
    items = list(open_dataset(f"imagenet-s:{tmp_path}"))
    assert [it.id for it in items] == [
        "n01443537/ILSVRC2012_val_00000001",
        "n01491361/ILSVRC2012_val_00000002",
    ]
    a = items[0]
    assert a.labels == ["class_1", "class_300"]
    assert np.array_equal(a.masks["class_300"], ids["a"] == 300)
    assert np.array_equal(a.masks["class_1"], ids["a"] == 1)
    assert a.extra["class_ids"] == [1, 300] and a.extra["wnid"] == "n01443537"
    assert a.extra["ignore"].sum() == 1 and a.extra["ignore"][0, 7]
    assert a.image.size == (8, 6)


def test_imagenet_s_class_list(tmp_path):
    _write_imagenet_s(tmp_path)
    lines = [f"n{k:08d}" for k in range(1, 301)]
    lines[0] = "n01443537 goldfish"
    lines[299] = "n09999999 agaric"
    (tmp_path / "ImageNetS_categories_im300.txt").write_text("\n".join(lines) + "\n")
    items = list(open_dataset(f"imagenet-s:{tmp_path}"))
    assert items[0].labels == ["goldfish", "agaric"]
    assert items[1].labels == ["n00000002"]  # a bare wnid line is its own label


def test_imagenet_s_errors(tmp_path):
    with pytest.raises(DatasetError, match="segmentation folder"):
        (tmp_path / "validation").mkdir()
        open_dataset(f"imagenet-s:{tmp_path}")
    _write_imagenet_s(tmp_path)
    (tmp_path / "validation" / "n01491361" / "ILSVRC2012_val_00000002.JPEG").unlink()
    ds = open_dataset(f"imagenet-s:{tmp_path}")
    with pytest.raises(DatasetError, match="no image") as e:
        list(ds)
    _one_line(e)
    (tmp_path / "classes.txt").write_text("only\nthree\nclasses\n")
    with pytest.raises(DatasetError, match="class id 300"):
        next(iter(open_dataset(f"imagenet-s:{tmp_path}")))


# ----------------------------------------------------------------------------- openimages points

OI_HEADER = [
    "ImageId",
    "X",
    "Y",
    "Label",
    "EstimatedYesNo",
    "Source",
    "YesVotes",
    "NoVotes",
    "UnsureVotes",
    "TextLabel",
]


def _write_openimages(root: Path, header=OI_HEADER, rows=None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rows = rows or [
        ["ffff0002", "0.5", "0.25", "/m/01yrx", "yes", "ih", "2", "0", "0", ""],
        ["0000aaa1", "0.1", "0.2", "/m/0bt9lr", "yes", "ih", "3", "0", "0", ""],
        ["0000aaa1", "0.9", "0.8", "/m/0bt9lr", "no", "ih", "0", "3", "0", ""],
        ["0000aaa1", "0.5", "0.5", "/m/0bt9lr", "unsure", "ih", "1", "1", "1", ""],
        ["0000aaa1", "0.75", "0.5", "/m/01yrx", "no", "ih", "0", "2", "0", ""],
        ["0000aaa1", "0.3", "0.6", "/m/0bt9lr", "YES", "ih", "2", "1", "0", ""],
    ]
    with open(root / "oidv7-val-annotations-point-labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    with open(root / "oidv7-class-descriptions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["LabelName", "DisplayName"])
        w.writerow(["/m/0bt9lr", "Dog"])
        w.writerow(["/m/01yrx", "Cat"])
    _save_rgb(root / "images" / "0000aaa1.jpg", _rgb(50, 100, 1))
    _save_rgb(root / "images" / "ffff0002.jpg", _rgb(40, 20, 2))


def test_openimages_points(tmp_path):
    _write_openimages(tmp_path)
    items = list(open_dataset(f"openimages-points:{tmp_path}"))
    assert [it.id for it in items] == ["0000aaa1", "ffff0002"]  # sorted by ImageId
    a = items[0]
    assert a.masks is None and a.image.size == (100, 50)
    assert a.labels == ["Dog"]  # Cat has only a "no" point here
    yes, no = a.points["Dog"]
    assert yes.tolist() == [[10.0, 10.0], [30.0, 30.0]]  # X * width, Y * height
    assert no.tolist() == [[90.0, 40.0]]
    cat_yes, cat_no = a.points["Cat"]
    assert cat_yes.shape == (0, 2) and cat_no.tolist() == [[75.0, 25.0]]
    assert a.extra["unsure"] == {"Dog": 1}
    b = items[1]
    assert b.labels == ["Cat"] and b.points["Cat"][0].tolist() == [[10.0, 10.0]]
    # the CSV itself as PATH, limit, re-iteration
    ds = open_dataset(f"openimages-points:{tmp_path / 'oidv7-val-annotations-point-labels.csv'}", limit=1)
    assert [it.id for it in ds] == ["0000aaa1"] and [it.id for it in ds] == ["0000aaa1"]


def test_openimages_points_labelname_header_and_no_descriptions(tmp_path):
    header = ["ImageId", "Source", "LabelName", "X", "Y", "EstimatedYesNo"]
    rows = [["0000aaa1", "ih", "/m/0bt9lr", "0.1", "0.2", "yes"]]
    _write_openimages(tmp_path, header, rows)
    (tmp_path / "oidv7-class-descriptions.csv").unlink()
    it = next(iter(open_dataset(f"openimages-points:{tmp_path}")))
    assert it.labels == ["/m/0bt9lr"]


def test_openimages_points_errors(tmp_path):
    _write_openimages(tmp_path, ["ImageId", "X", "Y", "EstimatedYesNo"], [["a", "0", "0", "yes"]])
    with pytest.raises(DatasetError, match="lacks the column") as e:
        open_dataset(f"openimages-points:{tmp_path}")
    _one_line(e)
    bad = tmp_path / "bad"
    _write_openimages(bad, rows=[["0000aaa1", "0.1", "0.2", "/m/0bt9lr", "maybe", "ih", "0", "0", "0", ""]])
    with pytest.raises(DatasetError, match="line 2"):
        list(open_dataset(f"openimages-points:{bad}"))
    gone = tmp_path / "gone"
    _write_openimages(gone)
    (gone / "images" / "ffff0002.jpg").unlink()
    with pytest.raises(DatasetError, match="ffff0002"):
        list(open_dataset(f"openimages-points:{gone}"))


# ----------------------------------------------------------------------------- coco

# Oracles produced once with pycocotools 2.0.11 (mask.encode / frPyObjects + decode).
RLE_7x9 = {"size": [7, 9], "counts": "6183K00000006MM"}
RLE_7x9_COUNTS = [6, 1, 8, 4, 3, 4, 3, 4, 3, 4, 3, 4, 9, 1, 6]
STAR = [32.0, 15.0, 24.0, 17.9, 23.7, 26.4, 18.5, 19.8, 10.3, 22.1,
        15.0, 15.0, 10.3, 7.9, 18.5, 10.2, 23.7, 3.6, 24.0, 12.1]  # fmt: skip
STAR_RLE = {"size": [30, 40], "counts": "b:2:070G191C0>1@0`071N1000O2N2M3N3M27@9N10001N1000P8"}


def _mask_7x9() -> np.ndarray:
    m = np.zeros((7, 9), dtype=bool)
    m[1:5, 2:7] = True
    m[6, 0] = True
    m[0, 8] = True
    return m


def test_rle_decoding_matches_pycocotools():
    assert rle_string_to_counts(RLE_7x9["counts"]) == RLE_7x9_COUNTS
    assert np.array_equal(decode_rle(RLE_7x9), _mask_7x9())
    assert np.array_equal(decode_rle({"size": [7, 9], "counts": RLE_7x9_COUNTS}), _mask_7x9())
    star = decode_rle(STAR_RLE)
    assert star.shape == (30, 40) and star.sum() == 178
    with pytest.raises(ValueError, match="add up"):
        decode_rle({"size": [7, 9], "counts": [6, 1]})
    with pytest.raises(ValueError):
        rle_string_to_counts("6a")  # 'a' = 49 has the continuation bit and nothing follows


def test_polygon_rasterisation_matches_pycocotools():
    rect = rasterize_polygons([[1, 1, 6, 1, 6, 4, 1, 4]], 6, 8)
    want = np.zeros((6, 8), dtype=bool)
    want[1:4, 1:6] = True  # pycocotools: pixel centres inside, a 5 x 3 block
    assert np.array_equal(rect, want)
    star = rasterize_polygons([STAR], 30, 40)
    assert (star != decode_rle(STAR_RLE)).sum() <= 3  # boundary pixels only
    two = rasterize_polygons([[0, 0, 2, 0, 2, 2, 0, 2], [4, 4, 6, 4, 6, 6], [1, 2]], 6, 8)
    assert two[:2, :2].all() and two[4, 5] and two.sum() == 4 + 3  # the 1-point polygon is skipped


def _write_coco(root: Path) -> Path:
    (root / "annotations").mkdir(parents=True)
    _save_rgb(root / "val2017" / "000000000002.jpg", _rgb(7, 9, 3))
    _save_rgb(root / "val2017" / "000000000001.jpg", _rgb(6, 8, 4))
    _save_rgb(root / "val2017" / "000000000003.jpg", _rgb(5, 5, 5))
    data = {
        "images": [
            {"id": 2, "file_name": "000000000002.jpg", "height": 7, "width": 9},
            {"id": 1, "file_name": "000000000001.jpg", "height": 6, "width": 8},
            {"id": 3, "file_name": "000000000003.jpg", "height": 5, "width": 5},
        ],
        "categories": [{"id": 18, "name": "dog", "supercategory": "animal"}, {"id": 1, "name": "person"}],
        "annotations": [
            {
                "id": 10,
                "image_id": 1,
                "category_id": 18,
                "iscrowd": 0,
                "segmentation": [[1, 1, 6, 1, 6, 4, 1, 4]],
            },
            {
                "id": 11,
                "image_id": 1,
                "category_id": 18,
                "iscrowd": 0,
                "segmentation": [[6, 5, 8, 5, 8, 6, 6, 6]],
            },
            {
                "id": 12,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 1,
                "segmentation": {"size": [6, 8], "counts": [0, 6, 42]},
            },
            {"id": 13, "image_id": 2, "category_id": 1, "iscrowd": 0, "segmentation": RLE_7x9},
        ],
    }
    path = root / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_reader(tmp_path):
    path = _write_coco(tmp_path)
    ds = open_dataset(f"coco:{path}")  # images found in ../val2017 by the split name
    items = list(ds)
    assert [it.id for it in items] == ["1", "2", "3"]
    one = items[0]
    assert one.labels == ["person", "dog"]  # category id order
    dog = np.zeros((6, 8), dtype=bool)
    dog[1:4, 1:6] = True
    dog[5, 6:8] = True  # the second instance, merged
    assert np.array_equal(one.masks["dog"], dog)
    assert np.array_equal(one.masks["person"], _first_column(6, 8))
    assert one.extra["instances"] == {"dog": 2, "person": 1}
    assert np.array_equal(items[1].masks["person"], _mask_7x9())
    assert items[2].labels == [] and items[2].masks == {}
    no_crowd = next(iter(open_dataset(f"coco:{path}", include_crowd=False)))
    assert no_crowd.labels == ["dog"]


def _first_column(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[:, 0] = True  # counts [0, 6, 42]: the first 6 pixels in column-major order
    return m


def test_coco_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(DatasetError, match="not valid JSON") as e:
        open_dataset(f"coco:{bad}")
    _one_line(e)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetError, match="categories"):
        open_dataset(f"coco:{bad}")
    path = _write_coco(tmp_path / "c")
    (tmp_path / "c" / "val2017" / "000000000001.jpg").unlink()
    with pytest.raises(DatasetError, match="images_dir"):
        open_dataset(f"coco:{path}")
    ds = open_dataset(f"coco:{path}", images_dir=tmp_path / "c" / "val2017")
    with pytest.raises(DatasetError, match="image not found"):
        list(ds)
    with pytest.raises(DatasetError, match="unknown option"):
        open_dataset(f"coco:{path}", colour="red")


# ----------------------------------------------------------------------------- folder


def _write_folder(root: Path) -> dict:
    a_mask = np.zeros((6, 9), dtype=bool)
    a_mask[2:4, 3:8] = True
    car = np.zeros((5, 4), dtype=bool)
    car[0, :] = True
    dog = np.zeros((5, 4), dtype=bool)
    dog[4, 3] = True
    _save_rgb(root / "images" / "a.png", _rgb(6, 9, 1))
    _save_rgb(root / "images" / "b.jpg", _rgb(5, 4, 2))
    _save_rgb(root / "images" / "c.png", _rgb(3, 3, 3))
    _save_mask(root / "masks" / "a.png", a_mask)
    _save_mask(root / "masks" / "b__red_car.png", car)
    # a palette mask with index 1 for the object: non-zero counts, whatever the palette says
    p = Image.fromarray(dog.astype(np.uint8), mode="P")
    p.putpalette([0, 0, 0, 1, 1, 1] + [0] * (256 * 3 - 6))
    p.save(root / "masks" / "b__dog.png")
    return {"a": a_mask, "car": car, "dog": dog}


def test_folder_reader(tmp_path):
    truth = _write_folder(tmp_path)
    items = list(open_dataset(f"folder:{tmp_path}"))
    assert [it.id for it in items] == ["a", "b", "c"]
    assert items[0].labels == ["object"] and np.array_equal(items[0].masks["object"], truth["a"])
    assert items[1].labels == ["dog", "red car"]
    assert np.array_equal(items[1].masks["red car"], truth["car"])
    assert np.array_equal(items[1].masks["dog"], truth["dog"])
    assert items[2].labels == [] and items[2].masks == {}
    assert items[0].image.size == (9, 6) and items[1].image.mode == "RGB"
    assert [it.id for it in open_dataset(f"folder:{tmp_path}", limit=2)] == ["a", "b"]
    assert list(open_dataset(f"folder:{tmp_path}", limit=0)) == []


def test_folder_errors(tmp_path):
    root = tmp_path / "x"
    _write_folder(root)
    _save_mask(root / "masks" / "zzz.png", np.ones((2, 2), bool))
    with pytest.raises(DatasetError, match="no image zzz") as e:
        open_dataset(f"folder:{root}")
    _one_line(e)
    (root / "masks" / "zzz.png").unlink()
    _save_mask(root / "masks" / "c.png", np.ones((4, 4), bool))  # image c is 3 x 3
    with pytest.raises(DatasetError, match="3x3"):
        list(open_dataset(f"folder:{root}"))
    (root / "masks" / "c.png").unlink()
    (root / "images" / "b.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    ds = open_dataset(f"folder:{root}")
    with pytest.raises(DatasetError, match="cannot read image"):
        list(ds)
    _save_rgb(root / "images" / "d__e.png", _rgb(2, 2, 0))
    with pytest.raises(DatasetError, match="'__'"):
        open_dataset(f"folder:{root}")
    with pytest.raises(DatasetError, match="limit"):
        open_dataset(f"folder:{tmp_path / 'x'}", limit=-1)


# ----------------------------------------------------------------------------- shapes


def _write_shapes(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    records = []
    for i, objs in enumerate([[("red", "triangle"), ("blue", "circle")], [("green", "square")]]):
        stem = f"{i:06d}"
        _save_rgb(root / "images" / f"{stem}.png", _rgb(16, 16, i))
        objects = []
        for k, (colour, shape) in enumerate(objs):
            m = np.zeros((16, 16), dtype=bool)
            m[k * 5 : k * 5 + 4, 2 + i : 8 + i] = True
            _save_mask(root / "masks" / f"{stem}_{k}.png", m)
            ys, xs = np.nonzero(m)
            objects.append(
                {
                    "label": f"{colour} {shape}",
                    "colour": colour,
                    "shape": shape,
                    "mask": f"masks/{stem}_{k}.png",
                    "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                    "area": int(m.sum()),
                }
            )
        records.append(
            {
                "id": stem,
                "seed": 100 + i,
                "image": f"images/{stem}.png",
                "width": 16,
                "height": 16,
                "objects": objects,
                "captions": [f"a {o['label']}" for o in objects],
                "compositional": " and ".join(f"a {o['label']}" for o in objects),
                "absent": ["a yellow star"],
            }
        )
    (root / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "dataset.json").write_text(
        json.dumps({"kind": "shapes", "version": 1, "seed": 0, "n": 2, "size": 16})
    )


def test_shapes_reader(tmp_path):
    _write_shapes(tmp_path)
    ds = open_dataset(f"shapes:{tmp_path}")
    assert ds.size == 2
    items = list(ds)
    assert [it.id for it in items] == ["000000", "000001"]
    a = items[0]
    assert a.labels == ["red triangle", "blue circle"]
    assert a.masks["blue circle"].sum() == 4 * 6 and a.masks["blue circle"][5:9, 2:8].all()
    assert a.extra["captions"] == ["a red triangle", "a blue circle"]
    assert a.extra["absent"] == ["a yellow star"]
    assert a.extra["objects"][1]["bbox"] == [2, 5, 8, 9]
    assert a.extra["meta"]["kind"] == "shapes"
    assert [it.id for it in open_dataset(f"shapes:{tmp_path}", limit=1)] == ["000000"]


def test_shapes_errors(tmp_path):
    root = tmp_path / "s"
    _write_shapes(root)
    (root / "dataset.json").write_text(json.dumps({"kind": "coco"}))
    with pytest.raises(DatasetError, match="not describe a shapes dataset") as e:
        open_dataset(f"shapes:{root}")
    _one_line(e)
    (root / "dataset.json").write_text("{")
    with pytest.raises(DatasetError, match="cannot read"):
        open_dataset(f"shapes:{root}")
    (root / "dataset.json").write_text(json.dumps({"kind": "shapes"}))
    with open(root / "index.jsonl", "a") as fh:
        fh.write('{"id": "000002", "image": \n')
    ds = open_dataset(f"shapes:{root}")
    with pytest.raises(DatasetError, match="line 3"):
        list(ds)
    (root / "masks" / "000001_0.png").unlink()
    with pytest.raises(DatasetError, match="mask not found"):
        list(open_dataset(f"shapes:{root}"))


def test_shapes_reader_reads_the_world_writer(tmp_path):
    shapes = pytest.importorskip("cliplens.worlds.shapes")
    out = shapes.write_dataset(tmp_path / "world", n=3, seed=0, size=64)
    items = list(open_dataset(f"shapes:{out}"))
    assert len(items) == 3
    for it in items:
        assert it.image.size == (64, 64)
        assert it.labels == [o["label"] for o in it.extra["objects"]]
        for o in it.extra["objects"]:
            assert int(it.masks[o["label"]].sum()) == o["area"]
