"""The stages of the chain as functions: what ``lit-wsss pipeline``, ``lit-wsss gslm`` and ``lit-wsss benchmark``
run, in this process, one call a stage.

Lightning stages (``fit``, ``predict`` and the exports built on it) take the Lightning CLI arguments of the
stage (configs and ``--key=value`` overrides, the user's interface to every network); the file stages
(``evaluate``, ``ir_labels``, ``evaluate_segmentation``) are the functions the command-line tools
``eval-cam``, ``ir-labels`` and ``eval-seg`` wrap, called with keyword arguments, and return their results.
Every stage writes into its own folder with a manifest (style.md P8) and is skipped or resumed when its output
exists, so a chain can be rerun after a crash. :class:`StageRecorder` times each stage, prints one line and keeps
the chain's JSON summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lit_wsss.io import producer_num_classes, read_manifest, write_json_atomic

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
#: Written by :func:`fit` when a training run has ended: only then is ``last.ckpt`` the final checkpoint.
FIT_DONE = "fit_done.json"


def method_files(data: str, method: str) -> list[Path]:
    """The files of a method on a data set that exist, in layering order: ``experiments/methods/<method>.yaml``
    (the paper's recipe: only what differs from the constructor defaults), then ``experiments/<data>/<method>.yaml``
    (what the data set changes: lists, schedule, the synthetic set's CPU recipe)."""
    return [path for path in (EXPERIMENTS / "methods" / f"{method}.yaml", EXPERIMENTS / data / f"{method}.yaml")
            if path.is_file()]


def configs(data: str, method: str, extra: Sequence[str | Path] = ()) -> list[str]:
    """``--config`` arguments of a method on a data set: ``experiments/<data>/_base.yaml``, the method's files
    (:func:`method_files`, at least one), then ``extra`` config files."""
    base = EXPERIMENTS / data / "_base.yaml"
    if not base.is_file():
        known = sorted(p.parent.name for p in EXPERIMENTS.glob("*/_base.yaml"))
        raise FileNotFoundError(f"unknown data set {data!r}: {base} does not exist (data sets: {', '.join(known)})")
    files = method_files(data, method)
    if not files:
        raise FileNotFoundError(f"no config of method {method!r} on data {data!r}: expected "
                                f"{EXPERIMENTS / 'methods' / f'{method}.yaml'} or {EXPERIMENTS / data / f'{method}.yaml'}")
    return [arg for path in (base, *files, *extra) for arg in ("--config", str(path))]


def fit(args: Sequence[str], run_dir: Path) -> Path:
    """Train with the Lightning CLI into ``run_dir`` and return ``run_dir/checkpoints/last.ckpt``.

    A finished run (its :data:`FIT_DONE` marker) is not repeated; an interrupted one resumes from its last
    epoch's ``last.ckpt``.
    """
    from lit_wsss.cli import run_cli

    last = run_dir / "checkpoints" / "last.ckpt"
    finished = run_dir / FIT_DONE
    if finished.is_file() and last.is_file():
        return last
    # last.ckpt is saved after every epoch (save_top_k 0 would write it only at the end, Lightning 2.6): without
    # the marker it is an interrupted run, resumed where it stopped
    resume = [f"--ckpt_path={last}"] if last.is_file() else []
    cli = run_cli(["fit", *args, f"--trainer.default_root_dir={run_dir}", "--trainer.logger=false",
                   "--trainer.callbacks=[{class_path: pytorch_lightning.callbacks.ModelCheckpoint, init_args: "
                   f"{{dirpath: {run_dir / 'checkpoints'}, save_last: true, save_top_k: 1}}}}]", *resume])
    if not last.is_file() and cli.trainer.fast_dev_run:
        # Lightning turns checkpointing off in a fast dev run; the next stage still needs the weights
        cli.trainer.save_checkpoint(last)
    if not last.is_file():
        raise RuntimeError(f"training finished without {last}")
    write_json_atomic(finished, {"checkpoint": str(last), "global_step": cli.trainer.global_step,
                                 "resumed": bool(resume)})
    return last


def predict(args: Sequence[str], out_dir: Path) -> None:
    """Predict with the Lightning CLI; the stage config's writer callback writes into ``out_dir`` (resumes)."""
    from lit_wsss.cli import run_cli

    # default_root_dir: the config Lightning saves (config.yaml) goes beside the files it produced
    run_cli(["predict", *args, f"--trainer.callbacks.init_args.out_dir={out_dir}",
             f"--trainer.default_root_dir={out_dir}"])


def export_cams(model_args: Sequence[str], checkpoint: Path, ids: str, folder: Path,
                writer_args: Sequence[str] = ()) -> None:
    """CAM files of the ids ``ids`` from ``checkpoint`` into ``folder`` (``experiments/stages/predict_cams.yaml``;
    a rerun resumes); ``writer_args`` set the stage config's CAMWriter (``--trainer.callbacks.init_args.*``)."""
    predict([*model_args, "--config", str(EXPERIMENTS / "stages" / "predict_cams.yaml"),
             f"--data.init_args.predict_list={ids}", f"--ckpt_path={checkpoint}", *writer_args], folder)


def segment(model_args: Sequence[str], checkpoint: Path, ids: str, folder: Path) -> None:
    """Label maps of the ids ``ids`` from a segmentation checkpoint (``experiments/stages/segment.yaml``)."""
    predict([*model_args, "--config", str(EXPERIMENTS / "stages" / "segment.yaml"),
             f"--data.init_args.predict_list={ids}", f"--ckpt_path={checkpoint}"], folder)


def produced_classes(folder: Path, what: str) -> int:
    """The foreground class count of the model that produced ``folder`` (its manifest's ``hparams``)."""
    count = producer_num_classes(read_manifest(folder, what, required=True))
    if count is None:
        raise ValueError(f"{folder / 'manifest.json'} states no class count (hparams.num_classes)")
    return count


def evaluate(cams: Path, root: str | Path, list_name: str, out: Path, num_classes: int | None = None,
             thresholds: str | None = None, fixed_threshold: float | None = None) -> dict[str, Any]:
    """``eval-cam`` of a CAM (or pseudo-label score) folder; ``num_classes`` defaults to its producer's."""
    from lit_wsss.evaluation import DEFAULT_THRESHOLDS, eval_cam

    return eval_cam(cams, root, list_name, out, thresholds or DEFAULT_THRESHOLDS,
                    num_classes or produced_classes(cams, "CAMs"), fixed_threshold=fixed_threshold, progress=False)


def ir_labels(cams: Path, root: str | Path, list_name: str, out: Path, workers: int,
              **options: Any) -> dict[str, Any]:
    """``ir-labels`` of a CAM folder (``options``: :data:`lit_wsss.refine.ir_labels.REFINEMENT_OPTIONS`)."""
    from lit_wsss.refine.ir_labels import ir_labels_of_list

    return ir_labels_of_list(cams, root, list_name, out, workers=workers, progress=False, **options)


def evaluate_segmentation(pred: Path, root: str | Path, list_name: str, out: Path,
                          num_classes: int | None = None) -> dict[str, Any]:
    """``eval-seg`` of a folder of label maps; ``num_classes`` defaults to the producing network's."""
    from lit_wsss.eval_seg import eval_seg

    return eval_seg(pred, root, list_name, out, num_classes or produced_classes(pred, "predictions"),
                    progress=False)


class StageRecorder:
    """Runs named stages: times each, prints one ``<prefix> | stage: ... | seconds: ...`` line with what the
    stage's ``result`` callable reports, and rewrites ``summary`` (a JSON list) after every stage."""

    def __init__(self, summary: Path, prefix: str) -> None:
        self.summary = summary
        self.prefix = prefix
        self.records: list[dict[str, Any]] = []

    def __call__(self, name: str, action: Callable[[], Any],
                 result: Callable[[], dict[str, Any]] | None = None) -> Any:
        start = time.perf_counter()
        value = action()
        record = {"stage": name, "seconds": round(time.perf_counter() - start, 1), **(result() if result else {})}
        self.records.append(record)
        print(f"{self.prefix} | " + " | ".join(f"{k}: {v}" for k, v in record.items()), flush=True)
        write_json_atomic(self.summary, self.records)
        return value
