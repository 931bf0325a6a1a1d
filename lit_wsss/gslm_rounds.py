"""``lit-wsss gslm``: GSLM's rounds as one command (../shared/methods/cls.md §2.3-§2.5); ``make train METHOD=gslm``.

GLM (the baseline CAM, ``experiments/<data>/cam.yaml``) -> CAMs of the training list -> seeds (confident
fg 0.30 / bg 0.05, dense CRF with Gaussian compat 10, 255 between) -> SLM round 1 (``gslm.yaml``, from the
GLM weights) -> its CAMs -> new seeds -> SLM round 2 (from round 1) -> ... Each round has a fresh optimizer
and poly schedule, evaluates at 0.15 + 0.1 r (``round_thresholds``), and keeps its CAMs, seeds, checkpoint
and evaluation under ``<out>/round<r>/``. The GLM's own CAMs are evaluated too, as the baseline. Every stage
is the ordinary CLI run, skipped when its output exists (a rerun resumes); ``<out>/gslm.json`` collects the
per-round mIoU. When the evaluation list is the training list, the CAMs scored after a round are exported
once and are also the next round's seed CAMs (``round<r+1>/cams``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from lit_wsss.evaluation import headline
from lit_wsss.io import read_manifest, write_json_atomic
from lit_wsss.losses.gslm import CONF_BG_THRESHOLD, CONF_FG_THRESHOLD, GSLM_CRF_PARAMS, NUM_ROUNDS, round_thresholds
from lit_wsss.pipeline import EXPERIMENTS, _configs, _fit, _predict, _tool

DEFAULT_ROOTS = {"synth": "data/synthetic"}
DEFAULT_LISTS = {"synth": ("train", "val"), "voc": ("train_aug", "train"), "coco": ("train2014", "train2014")}


def resolve_lists(data: str, train_list: str | None, eval_list: str | None) -> tuple[str, str]:
    """The seed (training) and evaluation lists: the given ones, else the data set's defaults."""
    default_train, default_eval = DEFAULT_LISTS.get(data, ("train", "train"))
    return train_list or default_train, eval_list or default_eval


def scored_cams(out: Path, after_round: int, train_list: str, eval_list: str) -> Path:
    """Where the CAMs scored after round ``after_round`` (-1: the GLM) are written."""
    if eval_list == train_list:  # they are also the next round's seed CAMs: one export
        return out / f"round{after_round + 1}" / "cams"
    return out / ("glm" if after_round < 0 else f"round{after_round}") / "eval_cams"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lit-wsss gslm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synth", help="experiments/<data>/ (synth, voc or coco)")
    parser.add_argument("--root", default=None, help="data root (default: synth data/synthetic; else required)")
    parser.add_argument("--train-list", default=None, help="ids whose seeds train the SLM (voc: train_aug)")
    parser.add_argument("--eval-list", default=None, help="ids scored after every round (voc: train)")
    parser.add_argument("--rounds", type=int, default=NUM_ROUNDS, help="SLM rounds (fuse_cam_num_iter 3)")
    parser.add_argument("--out", default=None, help="default outputs/gslm/<data>")
    parser.add_argument("--workers", type=int, default=2, help="processes for the seeds (CRF)")
    parser.add_argument("--config", action="append", default=[], help="extra config for every stage")
    parser.add_argument("--glm-args", default="", help="extra lit-wsss arguments for the GLM (training and CAMs)")
    parser.add_argument("--slm-args", default="", help="extra lit-wsss arguments for the SLM rounds")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = args.root or DEFAULT_ROOTS.get(args.data)
    if root is None:
        print("lit-wsss gslm: error: --root is required for --data " + args.data, file=sys.stderr)
        return 2
    train_list, eval_list = resolve_lists(args.data, args.train_list, args.eval_list)
    out = Path(args.out or f"outputs/gslm/{args.data}")
    out.mkdir(parents=True, exist_ok=True)
    data_args = [f"--data.init_args.root={root}"]
    glm = _configs(args.data, "cam", args.config) + data_args + shlex.split(args.glm_args)
    slm = _configs(args.data, "gslm", args.config) + data_args + shlex.split(args.slm_args)
    summary: list[dict[str, Any]] = []

    def stage(name: str, action: Any, result: Any = None) -> None:
        start = time.perf_counter()
        action()
        record = {"stage": name, "seconds": round(time.perf_counter() - start, 1), **(result() if result else {})}
        summary.append(record)
        print("gslm | " + " | ".join(f"{k}: {v}" for k, v in record.items()), flush=True)
        write_json_atomic(out / "gslm.json", summary)

    def export(model_args: list[str], checkpoint: Path, ids: str, folder: Path) -> None:
        if not (folder / "manifest.json").is_file():
            _predict([*model_args, "--config", str(EXPERIMENTS / "stages" / "predict_cams.yaml"),
                      f"--data.init_args.predict_list={ids}", f"--ckpt_path={checkpoint}"], folder)

    def evaluate(cams: Path, threshold: float, result: Path) -> dict[str, Any]:
        if not result.is_file():
            num_classes = read_manifest(cams, "CAMs", required=True)["hparams"]["num_classes"]
            _tool("lit_wsss.evaluation", ["--cams", str(cams), "--root", str(root), "--list", eval_list,
                                          "--num-classes", str(num_classes), "--fixed-threshold", str(threshold),
                                          "--no-progress", "--out", str(result)])
        scores = headline(json.loads(result.read_text()))
        return {"mIoU": f"{100 * scores['own']:.2f} ({scores['own_rule']})",
                "oracle": f"{100 * scores['best']:.2f} ({scores['best_rule']})"}

    def seeds(cams: Path, folder: Path) -> None:
        _tool("lit_wsss.refine.ir_labels", [
            "--cams", str(cams), "--root", str(root), "--list", train_list, "--out", str(folder),
            "--convention", "constant", "--fg", str(CONF_FG_THRESHOLD), "--bg", str(CONF_BG_THRESHOLD),
            "--crf-gaussian-compat", str(GSLM_CRF_PARAMS["gaussian"]["compat"]),
            "--workers", str(args.workers), "--no-progress"])

    glm_checkpoint = out / "glm" / "checkpoints" / "last.ckpt"
    stage("train GLM", lambda: _fit(glm, out / "glm"), lambda: {"checkpoint": str(glm_checkpoint)})
    glm_cams = scored_cams(out, -1, train_list, eval_list)
    stage("eval GLM", lambda: export(glm, glm_checkpoint, eval_list, glm_cams),
          lambda: evaluate(glm_cams, round_thresholds(0).eval_bg, out / "glm" / "eval_cams.json"))
    model_args, checkpoint = glm, glm_checkpoint
    for r in range(args.rounds):
        folder = out / f"round{r}"
        threshold = round_thresholds(r).eval_bg
        stage(f"round {r}: CAMs", lambda: export(model_args, checkpoint, train_list, folder / "cams"))
        stage(f"round {r}: seeds", lambda: seeds(folder / "cams", folder / "seeds"))
        start = (f"--model.init_args.glm_weights={glm_checkpoint}" if r == 0
                 else f"--model.init_args.init_weights={checkpoint}")
        round_args = [*slm, start, f"--data.init_args.seed_dir={folder / 'seeds'}",
                      f"--model.init_args.cam_bg_threshold={threshold}"]
        stage(f"round {r}: train SLM", lambda: _fit(round_args, folder / "slm"))
        model_args, checkpoint = round_args, folder / "slm" / "checkpoints" / "last.ckpt"
        round_cams = scored_cams(out, r, train_list, eval_list)
        stage(f"round {r}: eval SLM", lambda: export(model_args, checkpoint, eval_list, round_cams),
              lambda: evaluate(round_cams, threshold, folder / "eval_cams.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
