"""Hardening against bad and large input (issue 19): each test fails without its fix."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cliplens
from cliplens.adapters import load_model
from cliplens.errors import CliplensError, ImageError, InputError, ModelLoadError


def run_cli(args, capsys=None):
    from cliplens.cli import main

    return main([str(a) for a in args])


# ---- 1. a checkpoint without its tokenizer -------------------------------------------------------


def test_checkpoint_without_tokenizer_files_is_refused(tiny_checkpoint):
    for f in tiny_checkpoint.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            f.unlink()
    with pytest.raises(ModelLoadError, match="tokenizer") as info:
        load_model(tiny_checkpoint)
    assert "\n" not in str(info.value)


def test_tokenizer_that_encodes_prompts_alike_is_refused(tiny_checkpoint):
    from cliplens.adapters.hf_encoder import check_tokenizer_fits

    class Same:
        def __len__(self):
            return 49408

        def __call__(self, text):
            return {"input_ids": [49406, 320, 49407]}

    model = load_model(tiny_checkpoint).model
    with pytest.raises(ModelLoadError, match="alike"):
        check_tokenizer_fits(Same(), model.text_model, "x")
    load_model(tiny_checkpoint)  # its own tokenizer fits


# ---- 2. the checkpoint's own CLIP processor, every variant ---------------------------------------

PROCESSOR_VARIANTS = {
    "shortest_edge+crop": {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
    "squash": {"size": {"height": 32, "width": 40}, "do_center_crop": False},
    "squash+crop": {"size": {"height": 40, "width": 48}, "crop_size": {"height": 32, "width": 32}},
    "squash+uneven crop": {"size": {"height": 45, "width": 37}, "crop_size": {"height": 24, "width": 32}},
}


@pytest.mark.parametrize("variant", list(PROCESSOR_VARIANTS))
@pytest.mark.parametrize("shape", [(53, 37), (30, 70)])
def test_clip_processor_variants_match_transformers(variant, shape):
    import warnings

    from cliplens.preprocess import preprocess_from_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import CLIPImageProcessor

    cfg = {
        "do_center_crop": True,
        "image_mean": [0.4, 0.5, 0.6],
        "image_std": [0.2, 0.3, 0.25],
        "resample": 3,
    }
    cfg.update(PROCESSOR_VARIANTS[variant])
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (shape[1], shape[0], 3), dtype=np.uint8))
    want = CLIPImageProcessor(**cfg)(images=image, return_tensors="np")["pixel_values"][0]
    got, geometry = preprocess_from_config(cfg, 32)(image)
    assert tuple(got.shape) == want.shape, variant
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-4)
    assert geometry.input_size == (want.shape[2], want.shape[1])


# ---- 3. the token count of resize="full" ---------------------------------------------------------


def test_thin_image_full_resize_is_refused_by_token_count(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CLIPLENS_MAX_TOKENS", raising=False)
    thin = tmp_path / "thin.png"
    Image.new("RGB", (1000, 3), (200, 10, 10)).save(thin)
    with pytest.raises(InputError, match="CLIPLENS_MAX_TOKENS") as info:
        cliplens.explain("shapes", str(thin), ["a red square"], resize="full")
    assert "patch tokens" in str(info.value) and "\n" not in str(info.value)
    capsys.readouterr()
    code = run_cli(
        ["explain", thin, "-m", "shapes", "-t", "a red square", "--resize", "full", "--out", tmp_path / "o"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--max-tokens" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_max_tokens_option_is_for_the_run_only(tmp_path, monkeypatch):
    monkeypatch.delenv("CLIPLENS_MAX_TOKENS", raising=False)
    thin = tmp_path / "thin.png"
    Image.new("RGB", (300, 40)).save(thin)
    args = ["explain", thin, "-m", "shapes", "-t", "x", "--resize", "full", "--out", tmp_path / "o"]
    assert run_cli([*args, "--max-tokens", "20000"]) == 0
    assert "CLIPLENS_MAX_TOKENS" not in os.environ


def test_max_tokens_option_and_env_raise_the_limit(tmp_path, monkeypatch):
    from cliplens.preprocess import Preprocess

    monkeypatch.setenv("CLIPLENS_MAX_TOKENS", "3")
    recipe = Preprocess(size=32, crop=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(InputError, match="limit of 3"):
        recipe(Image.new("RGB", (64, 32)), resize="full", patch_size=8)
    monkeypatch.setenv("CLIPLENS_MAX_TOKENS", "32")
    pixels, _ = recipe(Image.new("RGB", (64, 32)), resize="full", patch_size=8)
    assert tuple(pixels.shape) == (3, 32, 64)


# ---- 4. overlays at display size -----------------------------------------------------------------


def _overlay_peak(size):
    import tracemalloc

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ex = cliplens.explain("shapes", image, ["a red square"])
    tracemalloc.start()
    picture = ex.overlay(0, 0, max_side=128)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return picture, peak


def test_overlay_at_display_size_uses_memory_independent_of_the_source():
    small, small_peak = _overlay_peak((160, 120))
    big, big_peak = _overlay_peak((2400, 1800))
    assert small.size == (128, 96) and big.size == (128, 96)
    # the source is 4.3 million pixels: a full-size float map alone would be 35 MB
    assert big_peak < 4 * small_peak + 2_000_000, (small_peak, big_peak)


def test_cli_overlays_are_display_size_unless_asked(tmp_path):
    image = tmp_path / "wide.png"
    Image.new("RGB", (1500, 600), (30, 60, 90)).save(image)
    assert run_cli(["explain", image, "-m", "shapes", "-t", "a red square", "--out", tmp_path / "a"]) == 0
    (png,) = (tmp_path / "a").glob("*.png")
    assert Image.open(png).size == (1024, 410)
    assert (
        run_cli(["explain", image, "-m", "shapes", "-t", "x", "--overlay-size", "0", "--out", tmp_path / "b"])
        == 0
    )
    (png,) = (tmp_path / "b").glob("*.png")
    assert Image.open(png).size == (1500, 600)


# ---- 5. one line, exit 2, a CliplensError: user mistakes -----------------------------------------

PHOTO_SIZE = (40, 40)


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", PHOTO_SIZE, (120, 30, 200)).save(path)
    return path


def one_line_error(capsys, code):
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("cliplens: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_weights_are_one_line(tiny_checkpoint, photo, tmp_path, capsys, damage):
    weights = tiny_checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"garbage": os.urandom(4000), "truncated": data[:5000], "empty": b""}[damage])
    with pytest.raises(ModelLoadError, match="could not load"):
        load_model(tiny_checkpoint)
    capsys.readouterr()
    code = run_cli(["explain", photo, "-t", "x", "-m", tiny_checkpoint, "--out", tmp_path / "o"])
    one_line_error(capsys, code)


@pytest.fixture
def open_tmp():
    """A temporary folder that 'nobody' can reach (pytest's tmp_path is private to root)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="cliplens-harden-"))
    path.chmod(0o755)
    yield path
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
    shutil.rmtree(path, ignore_errors=True)


def _preimport():
    # everything the CLI imports before it checks --out, imported while still privileged
    import tqdm  # noqa: F401

    import cliplens.api
    import cliplens.explanation
    import cliplens.viz.html
    import cliplens.viz.pages  # noqa: F401


class unprivileged:
    """Run a block as 'nobody' when the tests run as root (root writes anywhere)."""

    def __enter__(self):
        self.root = hasattr(os, "geteuid") and os.geteuid() == 0
        if self.root:
            os.setegid(65534)
            os.seteuid(65534)

    def __exit__(self, *exc):
        if self.root:
            os.seteuid(0)
            os.setegid(0)


def _no_model_load(monkeypatch):
    from cliplens import adapters

    def refuse(*a, **k):
        raise AssertionError("the output folder must be checked before the model loads")

    monkeypatch.setattr(adapters, "load_model", refuse)


@pytest.mark.parametrize("which", ["out", "parent"])
def test_read_only_out_is_refused_before_the_work(open_tmp, capsys, monkeypatch, which):
    photo = open_tmp / "photo.png"
    Image.new("RGB", PHOTO_SIZE).save(photo)
    base = open_tmp / "ro"
    base.mkdir()
    out = base / "out"
    if which == "out":
        out.mkdir()
        out.chmod(0o555)
    else:
        out = base / "sub" / "out"
        base.chmod(0o555)
    _no_model_load(monkeypatch)
    _preimport()
    with unprivileged():
        code = run_cli(["explain", photo, "-t", "x", "-m", "shapes", "--out", out])
    err = one_line_error(capsys, code)
    assert "not writable" in err


def test_out_dot_in_a_folder_whose_parent_is_read_only(open_tmp, capsys, monkeypatch):
    photo = open_tmp / "photo.png"
    Image.new("RGB", PHOTO_SIZE).save(photo)
    parent = open_tmp / "locked"
    here = parent / "work"
    here.mkdir(parents=True)
    (here / "old.txt").write_text("x")
    here.chmod(0o777)
    (here / "old.txt").chmod(0o666)
    parent.chmod(0o555)
    monkeypatch.chdir(here)
    _preimport()
    cliplens.load_model("shapes")  # reads the model files while privileged (cached imports)
    with unprivileged():
        code = run_cli(["explain", photo, "-t", "x", "-m", "shapes", "--out", ".", "--overwrite"])
    assert code == 0, capsys.readouterr().err
    names = sorted(os.listdir(here))
    assert "results.json" in names and "old.txt" not in names
    assert not [n for n in names if n.startswith(".partial") or n.endswith(".lock")]
    assert os.listdir(parent) == ["work"]


@pytest.mark.parametrize("device", ["banana", "cuda:0" if not torch.cuda.is_available() else "cuda:99"])
def test_bad_device_is_one_line(photo, tmp_path, capsys, device):
    code = run_cli(["explain", photo, "-t", "x", "-m", "shapes", "--device", device, "--out", tmp_path / "o"])
    assert "--device" in one_line_error(capsys, code)
    assert not (tmp_path / "o").exists()


def test_demo_negative_seed_is_one_line(tmp_path, capsys):
    code = run_cli(["demo", "--seed", "-1", "--out", tmp_path / "d"])
    assert "--seed" in one_line_error(capsys, code)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("template", ["a {} {name}", "a {}}", "{0} {}"])
def test_evaluate_bad_prompt_template_writes_nothing(tmp_path, capsys, template):
    out = tmp_path / "ev"
    code = run_cli(
        [
            "evaluate",
            "--model",
            "shapes",
            "--dataset",
            f"shapes:{tmp_path / 'sh'}",
            "--make-shapes",
            "2",
            "--limit",
            "1",
            "--methods",
            "chefer",
            "--metrics",
            "pointing",
            "--prompt",
            template,
            "--out",
            out,
        ]
    )
    assert "template" in one_line_error(capsys, code)
    assert not (out / "config.json").exists()


def test_ctrl_c_during_start_up_is_one_line(capsys, monkeypatch):
    from cliplens import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["methods"]) == 130
    assert capsys.readouterr().err == "cliplens: interrupted\n"


def test_ctrl_c_while_torch_imports_is_one_line():
    """The console script imports cliplens.cli, then calls main(): torch loads inside main."""
    code = (
        "import builtins\n"
        "real = builtins.__import__\n"
        "def imp(name, *a, **k):\n"
        "    if name == 'torch' or name.startswith('torch.'):\n"
        "        raise KeyboardInterrupt\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = imp\n"
        "from cliplens.cli import main\n"
        "raise SystemExit(main(['methods']))\n"
    )
    src = str(Path(cliplens.__file__).resolve().parent.parent)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": src},
        timeout=120,
    )
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "cliplens: interrupted\n"


def _closed_image():
    image = Image.new("RGB", (8, 8))
    image.close()
    return image


def _truncated_image(tmp_path):
    path = tmp_path / "cut.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:2000])
    return Image.open(path)


BAD_IMAGES = {
    "None": lambda tmp: None,
    "list of None": lambda tmp: [None],
    "tensor": lambda tmp: torch.zeros(3, 8, 8),
    "int": lambda tmp: 5,
    "bytes": lambda tmp: b"\x89PNG\r\n",
    "0x0 array": lambda tmp: np.zeros((0, 0, 3), np.uint8),
    "truncated PIL": _truncated_image,
    "closed PIL": lambda tmp: _closed_image(),
}


@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_api_refuses_bad_images_with_one_line(tiny_adapter, tmp_path, kind):
    images = BAD_IMAGES[kind](tmp_path)
    for call in (cliplens.explain, cliplens.similarity):
        with pytest.raises(CliplensError) as info:
            call(tiny_adapter, images, ["a cat"])
        assert "\n" not in str(info.value)


# ---- 6. SIGTERM and kills leave no hidden staging folders ----------------------------------------


def _hidden(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def test_sigterm_during_the_work_cleans_up_like_ctrl_c(tmp_path, photo, capsys, monkeypatch):
    import signal

    from cliplens.viz import pages

    def killed(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(pages, "write_overlays", killed)
    before = signal.getsignal(signal.SIGTERM)
    code = run_cli(["explain", photo, "-t", "x", "-m", "shapes", "--out", tmp_path / "o"])
    assert code == 143 and capsys.readouterr().err == "cliplens: terminated\n"
    assert not (tmp_path / "o").exists() and _hidden(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is before  # restored after the call


def test_staging_folders_of_dead_processes_are_swept(tmp_path, photo):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".o.partial-{dead_pid}-abcd"
    (stale / "sub").mkdir(parents=True)
    live = tmp_path / f".o.partial-{os.getpid()}-efgh"  # a running process's: left alone
    live.mkdir()
    assert run_cli(["explain", photo, "-t", "x", "-m", "shapes", "--out", tmp_path / "o"]) == 0
    assert not stale.exists() and live.exists()


def test_a_killed_run_leaves_a_folder_the_next_run_sweeps(tmp_path, photo):
    import signal
    import time

    src = str(Path(cliplens.__file__).resolve().parent.parent)
    code = (
        "import time, sys\n"
        "from cliplens.viz import pages\n"
        "def hang(*a, **k):\n"
        "    print('staged', flush=True); time.sleep(60)\n"
        "pages.write_overlays = hang\n"
        "from cliplens.cli import main\n"
        f"main(['explain', {str(photo)!r}, '-t', 'x', '-m', 'shapes', '--out', {str(tmp_path / 'o')!r}])\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"},
    )
    assert proc.stdout.readline().strip() == "staged"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert any(".partial-" in n for n in _hidden(tmp_path))  # what a kill leaves
    time.sleep(0.1)
    assert run_cli(["explain", photo, "-t", "x", "-m", "shapes", "--out", tmp_path / "o"]) == 0
    assert _hidden(tmp_path) == []


# ---- 7. an --out that already holds files --------------------------------------------------------


def test_non_empty_foreign_folder_is_refused_unless_overwrite(tmp_path, photo, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    code = run_cli(["explain", photo, "-t", "x", "-m", "shapes", "--out", out])
    assert "--overwrite" in one_line_error(capsys, code)
    assert os.listdir(out) == ["thesis.tex"]
    assert run_cli(["explain", photo, "-t", "x", "-m", "shapes", "--out", out, "--overwrite"]) == 0
    assert not (out / "thesis.tex").exists() and (out / "results.json").is_file()


def test_an_earlier_output_is_replaced_as_a_whole(tmp_path, photo):
    out = tmp_path / "o"
    assert run_cli(["explain", photo, "-t", "a cat", "-t", "a dog", "-m", "shapes", "--out", out]) == 0
    assert len(list(out.glob("*.png"))) == 2
    assert run_cli(["explain", photo, "-t", "a cat", "-m", "shapes", "--out", out]) == 0
    assert len(list(out.glob("*.png"))) == 1  # the dog's overlay of the earlier run is gone
    assert _hidden(tmp_path) == []


def test_a_concurrent_run_is_locked_out(tmp_path, photo, capsys, monkeypatch):
    out = tmp_path / "o"
    _no_model_load(monkeypatch)  # refused before the work
    lock = tmp_path / ".o.lock"
    lock.write_text(str(os.getppid()))  # a live process holds it
    code = run_cli(["explain", photo, "-t", "x", "-m", "shapes", "--out", out])
    assert "another cliplens run" in one_line_error(capsys, code)
    assert not out.exists() and lock.read_text() == str(os.getppid())
    assert not list(tmp_path.glob(".o.partial-*"))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True, text=True
    )
    lock.write_text(dead.stdout.strip())  # a stale lock of a dead run is taken over
    monkeypatch.undo()
    assert run_cli(["explain", photo, "-t", "x", "-m", "shapes", "--out", out]) == 0
    assert not lock.exists()


# ---- 8. option checks ------------------------------------------------------------------------------


def test_max_pixels_must_be_positive(photo, tmp_path, capsys):
    code = run_cli(
        ["explain", photo, "-t", "x", "-m", "shapes", "--max-pixels", "0", "--out", tmp_path / "o"]
    )
    assert "--max-pixels" in one_line_error(capsys, code)
    with pytest.raises(ImageError, match="max_pixels"):
        cliplens.explain("shapes", str(photo), ["x"], max_pixels=0)


def test_contrast_index_text_and_explicit_index():
    from cliplens.targets import resolve_target

    texts = ["a cat", "1", "a dog"]
    assert resolve_target("contrast:1", texts).index(texts) == 1
    assert resolve_target("contrast:#2", texts).index(texts) == 2  # '#' always means an index
    assert resolve_target("contrast:#1", texts).index(texts) == 1
    assert resolve_target("contrast:2", texts).index(texts) == 2  # the old form, unambiguous
    texts = ["0", "a cat"]
    assert resolve_target("contrast:0", texts).index(texts) == 0
    assert resolve_target("contrast:#1", texts).index(texts) == 1
    with pytest.raises(InputError, match="#K"):
        resolve_target("contrast:#x", texts)
    texts = ["2", "a cat", "a dog"]
    assert resolve_target("contrast:2", texts).index(texts) == 0  # "2" is a prompt: not index 2
    assert resolve_target("contrast:#2", texts).index(texts) == 2


@pytest.mark.parametrize("case", ["limit 0", "empty dataset"])
def test_evaluate_with_nothing_to_do_writes_and_reports_nothing(tmp_path, capsys, case):
    out = tmp_path / "ev"
    if case == "limit 0":
        from cliplens.worlds.shapes import write_dataset

        data = write_dataset(tmp_path / "sh", 2, seed=1, size=64)
        dataset, extra = f"shapes:{data}", ["--limit", "0"]
    else:
        (tmp_path / "empty" / "images").mkdir(parents=True)
        (tmp_path / "empty" / "masks").mkdir(parents=True)
        dataset, extra = f"folder:{tmp_path / 'empty'}", []
    code = run_cli(
        [
            "evaluate",
            "--model",
            "shapes",
            "--dataset",
            dataset,
            "--methods",
            "chefer",
            "--metrics",
            "pointing",
            "--out",
            out,
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "nothing to evaluate" in err, err
    assert not out.exists()


def test_evaluate_names_only_the_files_it_wrote(tmp_path):
    from cliplens.eval.cli import written_line

    (tmp_path / "results.md").write_text("x")
    (tmp_path / "curve.png").write_bytes(b"")
    assert written_line(str(tmp_path)) == f"wrote {tmp_path}/ (results.md, 1 PNG chart(s))"
    assert written_line(str(tmp_path / "none")) == "wrote nothing"


# ---- 9. the report: threads, multi-byte tokens, quiet loading ----------------------------------


def test_explain_threads_is_set_for_the_run_and_restored(photo, tmp_path, monkeypatch):
    from cliplens import api

    seen = []
    real = api.explain_request

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(api, "explain_request", spy)
    before = torch.get_num_threads()
    want = 2 if before != 2 else 1
    assert (
        run_cli(["explain", photo, "-t", "x", "-m", "shapes", "--threads", want, "--out", tmp_path / "o"])
        == 0
    )
    assert seen == [want] and torch.get_num_threads() == before


def test_multibyte_characters_show_whole_with_summed_scores(photo, tmp_path):
    import json

    from cliplens.viz.html import merge_byte_tokens

    prompt = "一只猫 on a café ☃"
    assert run_cli(["explain", photo, "-t", prompt, "-m", "shapes", "--out", tmp_path / "o"]) == 0
    page = (tmp_path / "o" / "index.html").read_text(encoding="utf-8")
    results = json.loads((tmp_path / "o" / "results.json").read_text(encoding="utf-8"))
    (pair,) = results["pairs"]
    assert "\ufffd" not in page
    for char in "一只猫☃":
        assert f">{char}<small>" in page
    ex = cliplens.explain("shapes", str(photo), [prompt])
    table = ex.token_table(0, 0)
    assert all("\ufffd" not in t for t, _ in table)
    merged = {t: (s, idx) for t, s, idx in merge_byte_tokens(table)}
    score, idx = merged["猫"]
    assert len(idx) == 3 and score == pytest.approx(sum(table[i][1] for i in idx), rel=1e-6)
    # results.json keeps one raw score per token
    raw = json.dumps(pair)
    assert len(ex.tokens[0]) > len(merge_byte_tokens([(t, 0.0) for t in ex.tokens[0]]))
    assert "\\\\xe7" in raw or "\\\\xe7" in json.dumps(results)


def test_load_model_prints_no_progress_bar_and_restores_the_setting(tiny_checkpoint, capfd):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    try:
        capfd.readouterr()
        load_model(tiny_checkpoint)
        assert "Loading weights" not in capfd.readouterr().err
        assert hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


def test_overwrite_never_empties_home_or_root(tmp_path, monkeypatch, capsys):
    from cliplens.files import check_output_dir

    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("x")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(InputError, match="will not replace"):
        check_output_dir(home, overwrite=True)
    with pytest.raises(InputError, match="will not replace"):
        check_output_dir("/", overwrite=True)
    assert (home / "notes.txt").exists()


def test_evaluate_unwritable_out_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = run_cli(
        [
            "evaluate",
            "--model",
            "shapes",
            "--dataset",
            f"shapes:{tmp_path / 'sh'}",
            "--make-shapes",
            "1",
            "--methods",
            "chefer",
            "--metrics",
            "pointing",
            "--out",
            blocker / "ev",
        ]
    )
    assert "cannot create the output folder" in one_line_error(capsys, code)
    assert not (tmp_path / "sh").exists()  # nothing drawn


def test_write_dataset_sweeps_the_temporary_folders_of_killed_runs(tmp_path):
    """A killed write_dataset leaves `.NAME.tmp-PID-*`; the next one removes those of dead
    processes (and keeps a live process's)."""
    import os

    from cliplens.worlds.shapes import write_dataset

    dead = tmp_path / ".data.tmp-999999999-abc"
    live = tmp_path / f".other.tmp-{os.getpid()}-xyz"
    dead.mkdir()
    live.mkdir()
    write_dataset(tmp_path / "data", 1, seed=0, size=32)
    assert not dead.exists() and live.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name and p != live]
