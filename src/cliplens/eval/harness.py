"""The evaluation harness: how faithful is each explanation, measured.

:func:`evaluate` runs every requested method (and the baselines) over a dataset and scores
the maps with the protocols of ``design/ALGORITHMS.md`` ("Evaluation protocols"):

- **segmentation** (pixel accuracy, mIoU, mAP) and the **pointing game** on the map brought
  onto the original image (:meth:`cliplens.Explanation.map_on_original`) against each
  labelled object's mask; **p-mIoU** where the dataset has point labels;
- **perturbation** (Chefer et al. 2021: positive / negative, 0..90% in steps of 10%) and
  **deletion / insertion** (Petsiuk et al. 2018) at the model input, re-running the model
  (:mod:`cliplens.eval.perturbation`);
- the **sanity check** (Adebayo et al. 2018): cascading randomisation of the image blocks
  (:mod:`cliplens.eval.sanity`).

Baselines go through the same code as the methods: ``random`` (uniform noise on the patch
grid, seeded per item), ``centre`` (a centred Gaussian on the grid) and, where masks exist,
``oracle`` (the fraction of each patch covered by the mask). All maps are patch maps of the
model input; the baselines are upsampled exactly like the methods' maps.

What is explained for each (image, labelled object) pair is chosen by ``target``:

- ``"logit"`` (default): the pair logit of the object's prompt (``"a {label}"`` on the shapes
  world, ``"a photo of a {label}."`` elsewhere; ``prompt=`` changes it);
- ``"probability"``: the softmax over the prompts of the image's objects;
- ``"class"``: the probability of the object's class under a CLIP zero-shot classifier
  (templates averaged as CLIP does, :mod:`cliplens.eval.classifier`) over the dataset's
  classes; if the label is not a class name the predicted class is explained;
- ``"class-contrast"``: the logit of that class minus the logit of the best other class.

Perturbation curves track the explained target itself (pair logit, class probability, ...).

Results are appended to ``OUT/results.jsonl`` one item at a time; a rerun with the same
configuration skips the finished items, a changed configuration is refused (``restart=True``
discards the old results). Everything is seeded.

The pieces, in the order an evaluation goes through them: :mod:`.config` (the knobs),
:mod:`.runner` (one item -> one record), :mod:`.store` (records on disk), :mod:`.summary`
(records -> numbers), :mod:`.report` (numbers -> files) and :mod:`.cli` (``cliplens
evaluate``). This module opens the dataset and the model and runs the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..adapters import ModelAdapter, adapt, load_model
from ..errors import DatasetError, InputError
from .cli import add_arguments, cmd_evaluate  # noqa: F401  (kept importable from here)
from .config import (  # noqa: F401  (the vocabulary, kept importable from here)
    ALL_METRICS,
    BASELINES,
    CURVES,
    HARNESS_VERSION,
    SHAPES_EVAL_SEED,
    TARGETS,
    EvalConfig,
    model_checksum,
    resolve_methods,
    resolve_metrics,
)
from .datasets import EvalDataset, open_dataset
from .export import PARQUET_FILE, require_pyarrow, write_parquet
from .report import COLUMNS, CSV_KEYS, REPORT_FILES  # noqa: F401
from .runner import ItemRunner
from .store import ResultStore
from .summary import EvalResults, summarise

__all__ = [
    "ALL_METRICS",
    "BASELINES",
    "SHAPES_EVAL_SEED",
    "TARGETS",
    "EvalConfig",
    "EvalResults",
    "ResultStore",
    "evaluate",
    "open_eval_dataset",
    "run_evaluation",
    "summarise",
]

#: The runner class the loop uses (a test interrupts a run by patching its ``evaluate_item``).
_Runner = ItemRunner

_MAKE_SHAPES_HINT = "draw N scenes there with --make-shapes N, or make_shapes=N in Python"


def evaluate(
    model: Any,
    methods: str | Sequence[str] | None = EvalConfig.methods,
    dataset: str = EvalConfig.dataset,
    *,
    limit: int | None = EvalConfig.limit,
    out: str | Path | None = EvalConfig.out,
    removal: str = EvalConfig.removal,
    metrics: str | Sequence[str] | None = EvalConfig.metrics,
    seed: int = EvalConfig.seed,
    target: str = EvalConfig.target,
    templates: str | Sequence[str] | None = EvalConfig.templates,
    classes: str | Sequence[str] | None = EvalConfig.classes,
    prompt: str | None = EvalConfig.prompt,
    steps: int = EvalConfig.steps,
    sanity_items: int = EvalConfig.sanity_items,
    pointing_tolerance: float = EvalConfig.pointing_tolerance,
    segmentation_protocol: str = EvalConfig.segmentation_protocol,
    ties: str = EvalConfig.ties,
    perturbation_protocol: str = EvalConfig.perturbation_protocol,
    make_shapes: int | None = EvalConfig.make_shapes,
    restart: bool = EvalConfig.restart,
    progress: bool = EvalConfig.progress,
    device: str | None = EvalConfig.device,
    dtype: str = EvalConfig.dtype,
    threads: int | None = EvalConfig.threads,
    parquet: bool = EvalConfig.parquet,
    command: str | None = None,
    on_item: Callable[[int, int, Callable[[], EvalResults]], None] | None = None,
) -> EvalResults:
    """Score explanation methods on a dataset; see the module docstring for the protocols.

    Args:
        model: an adapter, a model object or a :func:`cliplens.load_model` spec (``"shapes"``).
        methods: method names (list or ``"a,b"``); default every registered image method.
        dataset: ``"KIND:PATH"`` (:func:`cliplens.eval.open_dataset`), e.g. ``"shapes:data/val"``.
        limit: evaluate the first ``limit`` items only.
        out: output folder (``results.jsonl`` kept as items finish, reports at the end); None
            keeps everything in memory (no resume).
        removal: how removed patches are filled: ``mean`` (the image's channel means),
            ``blur`` (a Gaussian-blurred copy) or ``zero`` (0 in normalised input space).
        metrics: subset of :data:`ALL_METRICS`; default all (each is skipped where the data
            lacks what it needs).
        seed: seeds the random baseline and the sanity-check weights.
        target: one of :data:`TARGETS`.
        templates, classes: for the ``class`` targets: template set name / list / file, and
            the class names (default: the shapes world's labels for a shapes dataset).
        prompt: the template of a pair prompt (default ``"a {}"`` on shapes, else
            ``"a photo of a {}."``).
        steps: deletion / insertion steps (0..100% in ``steps`` equal steps).
        sanity_items: run the sanity check on the first this many items.
        pointing_tolerance: pointing-game tolerance in original pixels.
        segmentation_protocol: "cliplens", "chefer" (image and masks squashed to the model input
            and scored there) or "textspan" (chefer, map clipped at 0): see docs/evaluation.md.
        ties: "index" (tied relevance removed in flat index order) or "random" (shuffled within
            each tied group, curves averaged over 8 seeded draws).
        perturbation_protocol: "cliplens" or "chefer" (pixels of the upsampled map, black
            fill, top-1 accuracy against the class, AUC x 100; class targets only).
        make_shapes: for ``shapes:PATH`` with no folder at PATH, draw this many scenes there
            first (dataset seed :data:`SHAPES_EVAL_SEED`, 224 px).
        restart: discard results of an earlier, different configuration in ``out``.
        progress: show a tqdm progress bar.
        device: torch device of a model loaded from a spec.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (or the torch dtype): the weights
            of a model loaded from a spec. Stored: it changes the numbers, so a resumed run with
            another dtype is refused. A model object is used as it is (its dtype is recorded).
        threads: torch CPU threads during the run (restored after).
        parquet: also write ``OUT/records.parquet`` (:mod:`cliplens.eval.export`; needs pyarrow
            and ``out``).
        command: the command line shown in ``results.md``.
        on_item: called after each item as ``on_item(done, total, partial)``; ``partial()``
            summarises the items done so far (only when called). An exception it raises stops
            the run between items (items already done stay in ``out``'s store).

    Defaults are :class:`EvalConfig`'s; :func:`run_evaluation` takes a ready config.
    """
    config = EvalConfig(
        model=_model_name(model),
        methods=methods,
        dataset=dataset,
        target=target,
        removal=removal,
        metrics=metrics,
        seed=seed,
        steps=steps,
        pointing_tolerance=pointing_tolerance,
        segmentation_protocol=segmentation_protocol,
        ties=ties,
        perturbation_protocol=perturbation_protocol,
        sanity_items=sanity_items,
        prompt=prompt,
        templates=templates,
        classes=classes,
        limit=limit,
        make_shapes=make_shapes,
        restart=restart,
        device=device,
        dtype=dtype,
        threads=threads,
        parquet=parquet,
        progress=progress,
        out=None if out is None else os.fspath(out),
    )
    return run_evaluation(model, config, command=command, on_item=on_item)


def run_evaluation(
    model: Any,
    config: EvalConfig,
    *,
    command: str | None = None,
    on_item: Callable[[int, int, Callable[[], EvalResults]], None] | None = None,
) -> EvalResults:
    """Evaluate ``model`` (adapter, model object or spec) as ``config`` says: open the dataset
    (drawing shapes scenes if asked), open the model, complete the config, evaluate every item
    not already in the store, summarise, and write the reports where ``config.out`` is set."""
    from ..cli import check_device

    check_device(config.device)  # a one-line error before a dataset is drawn or a model loads
    if config.methods is not None:  # checked before the model loads; None: what the model runs (completed)
        config = dataclasses.replace(config, methods=resolve_methods(config.methods))
    if config.parquet:
        if config.out is None:
            raise InputError("parquet=True writes OUT/records.parquet: give out= as well")
        require_pyarrow()  # before anything runs
    ds = open_eval_dataset(config)
    assert ds is not None
    with _torch_threads(config.threads):
        if isinstance(model, (str, os.PathLike)):
            adapter: ModelAdapter = load_model(model, device=config.device, dtype=getattr(torch, config.dtype))
        else:
            adapter = adapt(model)
            have = str(adapter.dtype).removeprefix("torch.")
            if config.dtype != EvalConfig.dtype and have != config.dtype:
                raise InputError(
                    f"dtype {config.dtype!r} applies to a model loaded from a spec; this model's weights are {have}"
                )
        if adapter.fusion and (config.target.startswith("class") or config.perturbation_protocol == "chefer"):
            raise InputError(
                f"{adapter.name} is a fusion model ({adapter.family}): it scores pairs, not a zero-shot class "
                "over class names; use target logit or probability (and the cliplens perturbation protocol)"
            )
        per_pair = config.target == "logit" or (config.target == "probability" and adapter.pair_probability == "sigmoid")
        if "text_perturbation" in config.metrics and not per_pair:
            raise InputError(
                "text_perturbation scores each pair on its own: use target logit (or probability on a model "
                "with a per-pair sigmoid: SigLIP, fusion models)"
            )
        config = config.completed(adapter, ds)
        store = ResultStore(config.out, config, restart=config.restart, derived=(*REPORT_FILES, PARQUET_FILE))
        runner = _Runner(adapter, config)
        partial = None
        if on_item is not None:
            done_config = config

            def partial(seen: list[int]) -> EvalResults:
                return summarise(done_config, [store.records[i] for i in seen], command=command)

        seen = _run_items(runner, ds, store, progress=config.progress, on_item=on_item, partial=partial)
    records = [store.records[i] for i in seen]
    results = summarise(config, records, command=command)
    if store.out is not None:
        results.write(store.out)
        if config.parquet:
            write_parquet(records, store.out)
        elif (store.out / PARQUET_FILE).exists():  # an export of fewer items would be stale
            (store.out / PARQUET_FILE).unlink()
    return results


def open_eval_dataset(config: EvalConfig, *, draw: bool = True) -> EvalDataset | None:
    """The dataset of ``config`` (its first ``config.limit`` items). A missing ``shapes:PATH``
    with ``make_shapes`` is drawn first (dataset seed :data:`SHAPES_EVAL_SEED`), or, with
    ``draw=False`` (checking arguments before the model loads), None is returned."""
    kind, path = _dataset_spec(config.dataset)
    if kind == "shapes" and config.make_shapes and not path.exists():
        if not draw:
            return None
        from ..worlds.shapes import write_dataset

        write_dataset(path, int(config.make_shapes), seed=SHAPES_EVAL_SEED, progress=config.progress)
    try:
        return open_dataset(config.dataset, limit=config.limit)
    except DatasetError as exc:
        if kind == "shapes" and not path.exists():
            raise DatasetError(f"{exc} ({_MAKE_SHAPES_HINT})") from None
        raise


def _run_items(
    runner: ItemRunner,
    ds: EvalDataset,
    store: ResultStore,
    *,
    progress: bool,
    on_item: Callable[[int, int, Callable[[], EvalResults]], None] | None = None,
    partial: Callable[[list[int]], EvalResults] | None = None,
) -> list[int]:
    """Evaluate and store every item of ``ds`` the store does not hold yet; the indices of all
    items of ``ds``, in order. ``on_item`` (with ``partial``) is told after each item."""
    from tqdm import tqdm

    seen: list[int] = []
    bar = tqdm(total=ds.size, desc="evaluating", unit="item", disable=not progress, dynamic_ncols=True)
    try:
        for index, item in enumerate(ds):
            seen.append(index)
            old = store.records.get(index)
            if old is None:
                store.append(runner.evaluate_item(index, item))
            elif old.get("id") != item.id:
                raise InputError(
                    f"{store.out}: item {index} was {old.get('id')!r} and is now {item.id!r}; "
                    "the dataset changed: use --restart"
                )
            bar.update(1)
            if on_item is not None and partial is not None:
                done = list(seen)
                on_item(len(done), ds.size, lambda done=done: partial(done))
    finally:
        bar.close()
    return seen


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU thread count set to ``threads`` inside the block (None: unchanged)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(before)


def _model_name(model: Any) -> str:
    """What the config says about the model before it is open (the completed config holds the
    adapter's name)."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    return str(getattr(model, "name", type(model).__name__))


def _dataset_spec(spec: str) -> tuple[str, Path]:
    if not isinstance(spec, str) or ":" not in spec:
        # let the reader produce its one-line message
        open_dataset(spec)
    kind, _, path = spec.partition(":")
    return kind.strip().lower(), Path(path).expanduser()
