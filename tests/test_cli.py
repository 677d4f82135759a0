"""The command line end to end on a tiny checkpoint, and every bad input it must refuse."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliplens.cli import main


def run(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(path)
    return path


def _only_error_line(err: str, fragment: str):
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err  # one line, no traceback
    assert lines[0].startswith("cliplens: error: ")
    assert fragment in lines[0], lines[0]


def test_explain_end_to_end(tmp_path, capsys, photo, tiny_checkpoint):
    second = tmp_path / "second.jpg"
    Image.open(photo).resize((30, 90)).save(second)
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys, "explain", str(photo), str(second), "--text", "a cat", "-t", "a small dog",
        "--model", str(tiny_checkpoint), "--out", str(out), "--batch-size", "1",
    )
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert len(results["pairs"]) == 4
    html = (out / "index.html").read_text()
    for pair in results["pairs"]:
        assert (out / pair["overlay"]).is_file()
        assert pair["overlay"] in html
        assert np.array(pair["grid_map"]).shape == (4, 4)
        assert [t["token"] for t in pair["tokens"]] == pair["prompt"].split()
        assert 0 < pair["probability"] < 1
    probs = [p["probability"] for p in results["pairs"][:2]]
    assert sum(probs) == pytest.approx(1.0, abs=1e-6)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging left


def test_texts_file_and_method_listing(tmp_path, capsys, photo, tiny_checkpoint):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n  a dog  \n")
    out = tmp_path / "o"
    code, _, err = run(capsys, "explain", str(photo), "--texts-file", str(prompts), "--model", str(tiny_checkpoint), "--out", str(out))
    assert code == 0, err
    assert [p["prompt"] for p in json.loads((out / "results.json").read_text())["pairs"]] == ["a cat", "a dog"]
    code, stdout, _ = run(capsys, "methods")
    assert code == 0 and "chefer" in stdout


def test_texts_file_with_byte_order_mark(tmp_path, capsys, photo, tiny_checkpoint):
    """Notepad writes UTF-8 with a BOM; it must not become part of the first prompt."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a cat\r\na dog\r\n".encode("utf-8-sig"))
    out = tmp_path / "o"
    code, _, err = run(capsys, "explain", str(photo), "--texts-file", str(prompts), "--model", str(tiny_checkpoint), "--out", str(out))
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["texts"] == ["a cat", "a dog"]
    assert [t["token"] for t in results["pairs"][0]["tokens"]] == ["a", "cat"]


def _bad_files(tmp_path: Path, photo: Path) -> dict[str, tuple[Path, str]]:
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    truncated = tmp_path / "cut.png"
    data = photo.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    return {
        "missing": (tmp_path / "nope.png", "no such file"),
        "text": (text, "not an image"),
        "truncated": (truncated, "truncated"),
        "corrupt": (corrupt, "corrupt.jpg"),
        "empty": (empty, "not an image"),
        "directory": (tmp_path, "is a directory"),
    }


@pytest.mark.parametrize("kind", ["missing", "text", "truncated", "corrupt", "empty", "directory"])
def test_bad_images(tmp_path, capsys, photo, tiny_checkpoint, kind):
    path, fragment = _bad_files(tmp_path, photo)[kind]
    out = tmp_path / "out"
    code, _, err = run(capsys, "explain", str(photo), str(path), "-t", "a cat", "--model", str(tiny_checkpoint), "--out", str(out))
    assert code == 2
    _only_error_line(err, fragment)
    assert not out.exists()


def test_decompression_bomb_refused(tmp_path, capsys, tiny_checkpoint):
    big = tmp_path / "big.png"
    Image.new("RGB", (400, 300)).save(big)
    code, _, err = run(capsys, "explain", str(big), "-t", "x", "--model", str(tiny_checkpoint), "--max-pixels", "100000", "--out", str(tmp_path / "o"))
    assert code == 2
    _only_error_line(err, "pixel budget of 100000")
    assert "--max-pixels" in err


def test_bomb_header_refused_without_decoding(tmp_path, capsys, tiny_checkpoint, monkeypatch):
    """A PNG whose header claims 100000 x 100000 pixels is refused from the header alone."""
    import zlib

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    code, _, err = run(capsys, "explain", str(bomb), "-t", "x", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o"))
    assert code == 2
    _only_error_line(err, "CLIPLENS_MAX_PIXELS")


@pytest.mark.parametrize(
    "args, fragment",
    [
        ([], "no prompts"),
        (["-t", "a cat", "-t", "   "], "prompt 1 is empty"),
        (["-t", "a cat", "--method", "nope"], "unknown method"),
        (["-t", "a cat", "--target", "contrast:zebra"], "not among the prompts"),
        (["-t", "a cat", "--option", "depth=3"], "no option 'depth'"),
    ],
)
def test_bad_arguments(tmp_path, capsys, photo, tiny_checkpoint, args, fragment):
    out = tmp_path / "out"
    code, _, err = run(capsys, "explain", str(photo), *args, "--model", str(tiny_checkpoint), "--out", str(out))
    assert code == 2
    _only_error_line(err, fragment)
    assert not out.exists()


def test_model_that_is_not_clip(tmp_path, capsys, photo):
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, _, err = run(capsys, "explain", str(photo), "-t", "x", "--model", str(other), "--out", str(tmp_path / "o"))
    assert code == 2
    _only_error_line(err, "not a CLIP, SigLIP, BLIP, BLIP-2, ViLT, LXMERT or BridgeTower image-text checkpoint, nor a DETR detector")
    code, _, err = run(capsys, "explain", str(photo), "-t", "x", "--model", str(tmp_path / "empty-dir-missing"), "--out", str(tmp_path / "o"))
    assert code == 2


def test_default_model_unavailable_offline(tmp_path, capsys, photo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    code, _, err = run(capsys, "explain", str(photo), "-t", "x", "--out", str(tmp_path / "o"))
    assert code == 2
    _only_error_line(err, "openai/clip-vit-base-patch16")
    assert "--model shapes" in err


def _modes(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    paths = []
    for name, img in {
        "grey.png": Image.fromarray(rgb[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        "palette.gif": Image.fromarray(rgb).convert("P"),
        "deep.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
    }.items():
        img.save(tmp_path / name)
        paths.append(tmp_path / name)
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rotated.save(tmp_path / "exif.jpg", exif=exif)
    paths.append(tmp_path / "exif.jpg")
    return paths


def test_image_modes_work(tmp_path, capsys, tiny_checkpoint):
    paths = _modes(tmp_path)
    out = tmp_path / "out"
    code, _, err = run(capsys, "explain", *map(str, paths), "-t", "x", "--model", str(tiny_checkpoint), "--out", str(out))
    assert code == 0, err
    pairs = json.loads((out / "results.json").read_text())["pairs"]
    sizes = {Path(p["image"]).name: Image.open(out / p["overlay"]).size for p in pairs}
    assert sizes["exif.jpg"] == (40, 60)  # upright: the EXIF rotation was applied
    assert sizes["grey.png"] == (60, 40)


def test_sixteen_bit_scaled_not_clipped():
    from cliplens.images import to_rgb

    deep = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(deep))[0, :, 0].tolist() == [0, 128, 255]


def test_long_prompt_truncated_with_warning(tmp_path, capsys, photo, tiny_checkpoint):
    long = " ".join(["red"] * 40)  # the tiny model's context is 16 tokens
    out = tmp_path / "out"
    code, _, err = run(capsys, "explain", str(photo), "-t", long, "--model", str(tiny_checkpoint), "--out", str(out))
    assert code == 0
    assert "warning" in err and "truncated" in err
    pair = json.loads((out / "results.json").read_text())["pairs"][0]
    assert pair["truncated"] is True
    assert len(pair["tokens"]) == 14  # 16 minus the start and end markers


def _explain(capsys, tmp_path, *argv) -> tuple[Path, dict, str]:
    out = tmp_path / "out"
    code, _, err = run(capsys, "explain", *map(str, argv), "--out", str(out))
    assert code == 0, err
    return out, json.loads((out / "results.json").read_text()), (out / "index.html").read_text()


def test_same_stems_get_their_own_overlays(tmp_path, capsys, tiny_checkpoint, monkeypatch):
    """`explain a/cat.jpg b/cat.jpg cat-2.png` once wrote cat-2__00-a-cat.png twice, and a
    card showed another image's heatmap."""
    rng = np.random.default_rng(3)
    sizes = {"a/cat.jpg": (50, 70), "b/cat.jpg": (30, 90), "cat-2.png": (40, 40)}
    for name, (w, h) in sizes.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    out, results, html = _explain(capsys, tmp_path, *sizes, "-t", "a cat", "-t", "a dog", "--model", tiny_checkpoint)
    pairs = results["pairs"]
    overlays = [p["overlay"] for p in pairs]
    assert len(set(overlays)) == len(overlays) == 6
    for pair in pairs:
        assert Image.open(out / pair["overlay"]).size == sizes[pair["image"].removeprefix("../")]
        assert html.count(f"src='{pair['overlay']}'") == 1
    sections = html.split("<h2>")[1:]
    for name, section in zip(sizes, sections):  # each image's cards show its own overlays
        assert section.startswith(name)
        refs = re.findall(r"src='([^']+)'", section)
        assert refs == [p["overlay"] for p in pairs if p["image"] == f"../{name}"]


def test_results_json_is_the_explanation_dict_with_relative_paths(tmp_path, capsys, photo, tiny_checkpoint):
    out, results, _ = _explain(capsys, tmp_path, photo, "-t", "a cat", "-t", "a dog", "--model", tiny_checkpoint, "--method", "legrad")
    for key in ("format", "method", "target", "probability", "shape", "texts", "tokens", "meta", "images", "pairs"):
        assert key in results, key
    assert results["shape"] == [1, 2] and results["method"] == "legrad"
    assert (out / results["images"][0]["path"]).resolve() == photo.resolve()
    assert (out / results["pairs"][1]["image"]).resolve() == photo.resolve()
    assert results["images"][0]["extras"]["layer_maps"]["shape"][0] == 2  # (P, L, Gh, Gw)
    assert results["meta"]["model"] and results["display"] == {"normalise": "minmax"}


@pytest.mark.parametrize(
    "target, texts, reason",
    [
        ("contrast:0", ["a cat", "a dog"], "contrast of a prompt with itself"),
        ("probability", ["a cat"], "softmax over one prompt"),
    ],
)
def test_constant_target_gets_no_heatmap(tmp_path, capsys, tiny_checkpoint, target, texts, reason):
    """A target that is constant by construction has only rounding noise to show; min-max
    stretching made it look like a confident heatmap."""
    square = tmp_path / "square.png"  # square: the model sees all of it, nothing is hatched
    original = np.random.default_rng(4).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(original).save(square)
    argv = [a for t in texts for a in ("-t", t)]
    out, results, html = _explain(capsys, tmp_path, square, *argv, "--target", target, "--model", tiny_checkpoint)
    pair = results["pairs"][0]
    assert reason in pair["constant"]
    np.testing.assert_array_equal(np.asarray(Image.open(out / pair["overlay"])), original)
    assert reason in html and "no heatmap is drawn" in html
    if len(texts) > 1:  # the other prompt's pair is explained as usual
        assert results["pairs"][1]["constant"] is None
        assert not np.array_equal(np.asarray(Image.open(out / results["pairs"][1]["overlay"])), original)


def test_report_shows_the_numbers(tmp_path, capsys, photo, tiny_checkpoint):
    long = "a small red cat sitting on a chair near the window in the sun"
    _, results, html = _explain(capsys, tmp_path, photo, "-t", "a cat", "-t", long, "--model", tiny_checkpoint, "--normalise", "signed")
    assert html.count("class='bar'") == len(results["pairs"])  # a colour bar under every overlay
    for pair in results["pairs"]:
        m = max(abs(pair["map_min"]), abs(pair["map_max"]))
        assert f"<span>{-m:.3g}</span>" in html and f"<span>{m:.3g}</span>" in html  # its ends in raw values
        assert f"raw {pair['map_min']:.3g} … {pair['map_max']:.3g}" in html
        for tok in pair["tokens"]:
            assert f"{tok['token']}<small>{tok['score']:.3g}</small>" in html  # chips show their scores
        assert f"<td>{pair['logit']:.3g}</td>" in html and f"{pair['probability']:.3g}</td>" in html  # the table
    assert "<details class='fold'>" in html  # the long prompt folded
    _, _, html1 = _explain(capsys, tmp_path / "one", photo, "-t", "a cat", "--model", tiny_checkpoint)
    assert "one-prompt softmax: 1 by construction" in html1
