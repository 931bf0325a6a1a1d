"""``lit-wsss gslm``: GSLM's rounds as one command (../shared/methods/cls.md §2.3-§2.5); ``make train METHOD=gslm``.

GLM (the baseline CAM, ``experiments/methods/cam.yaml``) -> CAMs of the training list -> seeds (confident
fg 0.30 / bg 0.05, dense CRF with Gaussian compat 10, 255 between) -> SLM round 1 (``gslm.yaml``, from the
GLM weights) -> its CAMs -> new seeds -> SLM round 2 (from round 1) -> ... Each round has a fresh optimizer
and poly schedule, evaluates at 0.15 + 0.1 r (``round_thresholds``), and keeps its CAMs, seeds, checkpoint
and evaluation under ``<out>/round<r>/``. The GLM's own CAMs are evaluated too, as the baseline. Every stage
is the ordinary CLI run, skipped when its output exists (a rerun resumes); ``<out>/gslm.json`` collects the
per-round mIoU. When the evaluation list is the training list, the CAMs scored after a round are exported
once and are also the next round's seed CAMs (``round<r+1>/cams``).

Lightning overrides after the driver's own options go to every stage, as ``make train ARGS=...`` does for
the other methods: ``--trainer.*`` to the GLM's and every round's fit, ``--model.*`` / ``--data.*`` to the fits
and the CAM exports (``--data.init_args.root`` is the same as ``--root``). With ``--trainer.fast_dev_run``
every fit runs one batch and the whole chain runs in a temporary folder that is deleted afterwards (a fast
dev run is a check, never a result to resume from).

The GLM's CAMs are sized as GSLM's ``step/make_cam.py`` sizes them, straight to the image size
(``cam_high_res=full``), not on IRN's 16-padded canvas (issue 13).
"""

from __future__ import annotations

import argparse
import json
import operator
import shlex
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from collections.abc import Sequence
from typing import Any, NamedTuple

from lit_wsss.evaluation import headline
from lit_wsss.refine.ir_labels import CRF_PARAMS
from lit_wsss.stages import StageRecorder, configs, evaluate, export_cams, fit, ir_labels

#: ``conf_fg_thres`` / ``conf_bg_thres``: constant background planes of the seed cut (cls.md §2.3); the cut
#: itself is ``lit-wsss ir-labels --convention constant``, IRN's rule, conflicts to the 0.30 cut (P7).
CONF_FG_THRESHOLD = 0.30
CONF_BG_THRESHOLD = 0.05
#: ``cam_eval_thres`` and ``fuse_cam_eval_thres_inc``: evaluation threshold of round r = 0.15 + 0.1 r (§2.5).
EVAL_THRESHOLD = 0.15
EVAL_THRESHOLD_INCREMENT = 0.1
#: ``fuse_cam_num_iter``: number of SLM rounds (cls.md §2.5).
NUM_ROUNDS = 3
#: GSLM ``net/refiner/refiner.py`` CRF_PARAMS (cls.md §2.3): IRN's CRF but Gaussian compat 10, not 3; the seeds
#: stage passes that compat to ``ir-labels``.
GSLM_CRF_PARAMS: dict[str, Any] = {**CRF_PARAMS, "gaussian": {**CRF_PARAMS["gaussian"], "compat": 10}}

DEFAULT_ROOTS = {"synth": "data/synthetic"}
#: Option prefixes of the Lightning CLI passed through to the stages; trainer options reach the fits only.
TRAINER_OVERRIDES = ("--trainer.", "--seed_everything")
MODEL_DATA_OVERRIDES = ("--model.", "--data.")
#: GSLM's export resizes CAMs straight to the image size; the GLM is the baseline CAM, IRN's rule by default.
GLM_HIGH_RES = "--model.init_args.cam_high_res=full"
_FALSE = ("false", "0", "null", "none")


class RoundThresholds(NamedTuple):
    """Thresholds used after SLM round ``r`` (cls.md §2.5)."""

    #: background plane of the CAM evaluation of theta_{r+1} (0.15 + 0.1 r); also the final CAM's
    #: threshold after the last round (§3: 0.35).
    eval_bg: float
    #: planes of the seed cut Y_{r+1} (§2.3), constant across rounds.
    conf_fg: float
    conf_bg: float


def round_thresholds(round_index: int) -> RoundThresholds:
    """The threshold schedule of SLM round ``r`` (0-based: r = 0, 1, 2 for ``fuse_cam_num_iter = 3``).

    ``eval_bg = 0.15 + 0.1 r`` (0.15, 0.25, 0.35), rounded to 10 decimals so that logged values read
    0.35 rather than 0.35000000000000003; ``conf_fg / conf_bg = 0.30 / 0.05`` every round. Rounds past
    the official 3 continue the linear rise.

    Raises:
        ValueError: a negative or non-integer round index.
    """
    try:
        index = operator.index(round_index)  # ints and numpy integers; not floats
    except TypeError:
        index = -1
    if isinstance(round_index, bool) or index < 0:
        raise ValueError(f"round_index must be an integer >= 0, got {round_index!r}")
    return RoundThresholds(
        eval_bg=round(EVAL_THRESHOLD + EVAL_THRESHOLD_INCREMENT * index, 10),
        conf_fg=CONF_FG_THRESHOLD,
        conf_bg=CONF_BG_THRESHOLD,
    )


def split_overrides(extra: list[str]) -> tuple[list[str], list[str]]:
    """Lightning overrides as ``--key=value`` tokens: (trainer options, model and data options).

    ``--key value`` is joined into one token. Raises ``ValueError`` naming the first token that is no
    Lightning option.
    """
    trainer: list[str] = []
    model_data: list[str] = []
    index = 0
    while index < len(extra):
        token = extra[index]
        if not token.startswith(TRAINER_OVERRIDES + MODEL_DATA_OVERRIDES):
            raise ValueError(f"unrecognized argument {token!r}: expected the driver's options (--help) or "
                             "Lightning overrides (--trainer.*, --model.*, --data.*, --seed_everything)")
        if "=" not in token and index + 1 < len(extra) and not extra[index + 1].startswith("--"):
            token = f"{token}={extra[index + 1]}"
            index += 1
        (trainer if token.startswith(TRAINER_OVERRIDES) else model_data).append(token)
        index += 1
    return trainer, model_data


def _override_value(tokens: list[str], key: str) -> str | None:
    """The last value given to ``key`` (``--key=value``) in ``tokens``, else None."""
    values = [token.split("=", 1)[1] for token in tokens if token.split("=", 1)[0] == key and "=" in token]
    return values[-1] if values else None


def is_fast_dev_run(trainer_overrides: list[str]) -> bool:
    value = _override_value(trainer_overrides, "--trainer.fast_dev_run")
    return value is not None and value.strip().lower() not in _FALSE
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


def slm_checkpoint(out: Path, round_index: int) -> Path:
    """The SLM checkpoint of round ``round_index`` under the driver's ``--out``."""
    return out / f"round{round_index}" / "slm" / "checkpoints" / "last.ckpt"


def final_slm(data: str, root: str, config_files: Sequence[str], slm_args: Sequence[str], out: Path,
              rounds: int) -> tuple[list[str], Path]:
    """Arguments and checkpoint of the last round's SLM (to export CAMs of other ids, e.g. a held-out list)."""
    args = (configs(data, "gslm", config_files) + [f"--data.init_args.root={root}"] + list(slm_args)
            + [f"--model.init_args.cam_bg_threshold={round_thresholds(rounds - 1).eval_bg}"])
    return args, slm_checkpoint(out, rounds - 1)


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
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        trainer_overrides, model_data_overrides = split_overrides(extra)
    except ValueError as error:
        parser.error(str(error))
    override_root = _override_value(model_data_overrides, "--data.init_args.root")
    if override_root is not None and args.root is not None and override_root != args.root:
        parser.error(f"--root {args.root} and --data.init_args.root={override_root} disagree")
    root = args.root or override_root or DEFAULT_ROOTS.get(args.data)
    if root is None:
        parser.error("--root (or --data.init_args.root) is required for --data " + args.data)
    fast_dev_run = is_fast_dev_run(trainer_overrides)
    if fast_dev_run and args.out is not None:
        parser.error("--out with --trainer.fast_dev_run: a fast dev run is a throwaway check that runs in a "
                     "temporary folder and is never resumed; drop --out")
    with ExitStack() as cleanup:
        if fast_dev_run:
            out = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="lit-wsss-gslm-fast_dev_run-")))
            print(f"gslm | fast_dev_run: every fit runs one batch; outputs in {out} (deleted afterwards)", flush=True)
        else:
            out = Path(args.out or f"outputs/gslm/{args.data}")
        run_rounds(args.data, root, out, train_list=args.train_list, eval_list=args.eval_list, rounds=args.rounds,
                   workers=args.workers, config_files=args.config, glm_args=shlex.split(args.glm_args),
                   slm_args=shlex.split(args.slm_args), trainer_overrides=trainer_overrides,
                   model_data_overrides=model_data_overrides)
    return 0


def run_rounds(data: str, root: str, out: Path, *, train_list: str | None = None, eval_list: str | None = None,
               rounds: int = NUM_ROUNDS, workers: int = 2, config_files: Sequence[str] = (),
               glm_args: Sequence[str] = (), slm_args: Sequence[str] = (), trainer_overrides: Sequence[str] = (),
               model_data_overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """GLM -> seeds -> SLM round 0 -> ... -> SLM round ``rounds - 1`` under ``out`` (module docstring); returns
    the stage records (also in ``<out>/gslm.json``). ``glm_args`` / ``slm_args``: Lightning arguments of the GLM's
    and of every round's stages; ``trainer_overrides`` reach the fits only."""
    train_list, eval_list = resolve_lists(data, train_list, eval_list)
    out.mkdir(parents=True, exist_ok=True)
    data_args = [f"--data.init_args.root={root}"]
    glm = configs(data, "cam", config_files) + data_args + [GLM_HIGH_RES] + [*glm_args, *model_data_overrides]
    slm = configs(data, "gslm", config_files) + data_args + [*slm_args, *model_data_overrides]
    stage = StageRecorder(out / "gslm.json", "gslm")

    def export(model_args: list[str], checkpoint: Path, ids: str, folder: Path) -> None:
        if not (folder / "manifest.json").is_file():
            export_cams(model_args, checkpoint, ids, folder)

    def scored(cams: Path, threshold: float, result: Path) -> dict[str, Any]:
        if not result.is_file():
            evaluate(cams, root, eval_list, result, fixed_threshold=threshold)
        scores = headline(json.loads(result.read_text()))
        return {"mIoU": f"{100 * scores['own']:.2f} ({scores['own_rule']})",
                "oracle": f"{100 * scores['best']:.2f} ({scores['best_rule']})"}

    def seeds(cams: Path, folder: Path) -> None:
        ir_labels(cams, root, train_list, folder, workers, convention="constant", fg=CONF_FG_THRESHOLD,
                  bg=CONF_BG_THRESHOLD, crf_gaussian_compat=GSLM_CRF_PARAMS["gaussian"]["compat"])

    glm_checkpoint = out / "glm" / "checkpoints" / "last.ckpt"
    stage("train GLM", lambda: fit(glm + list(trainer_overrides), out / "glm"),
          lambda: {"checkpoint": str(glm_checkpoint)})
    glm_cams = scored_cams(out, -1, train_list, eval_list)
    stage("eval GLM", lambda: export(glm, glm_checkpoint, eval_list, glm_cams),
          lambda: scored(glm_cams, round_thresholds(0).eval_bg, out / "glm" / "eval_cams.json"))
    model_args, checkpoint = glm, glm_checkpoint
    for r in range(rounds):
        folder = out / f"round{r}"
        threshold = round_thresholds(r).eval_bg
        stage(f"round {r}: CAMs", lambda: export(model_args, checkpoint, train_list, folder / "cams"))
        stage(f"round {r}: seeds", lambda: seeds(folder / "cams", folder / "seeds"))
        start = (f"--model.init_args.glm_weights={glm_checkpoint}" if r == 0
                 else f"--model.init_args.init_weights={checkpoint}")
        round_args = [*slm, start, f"--data.init_args.seed_dir={folder / 'seeds'}",
                      f"--model.init_args.cam_bg_threshold={threshold}"]
        stage(f"round {r}: train SLM", lambda: fit(round_args + list(trainer_overrides), folder / "slm"))
        model_args, checkpoint = round_args, slm_checkpoint(out, r)
        round_cams = scored_cams(out, r, train_list, eval_list)
        stage(f"round {r}: eval SLM", lambda: export(model_args, checkpoint, eval_list, round_cams),
              lambda: scored(round_cams, threshold, folder / "eval_cams.json"))
    return stage.records


if __name__ == "__main__":
    sys.exit(main())
