"""The command line end to end on a tiny checkpoint, and every bad input it must refuse."""

from __future__ import annotations

import json
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
    _only_error_line(err, "not a CLIP or SigLIP checkpoint")
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
