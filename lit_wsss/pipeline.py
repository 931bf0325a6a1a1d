"""``lit-wsss pipeline``: the IRN chain as one command (../shared/methods/protocol.md, pipeline steps 1-7).

[train encoder ->] train CAM -> CAMs -> eval CAMs -> IR labels -> train IRNet -> pseudo labels -> eval pseudo labels
-> train segmentation -> segment -> eval segmentation (``--cams-only`` stops after eval CAMs,
``--no-segmentation`` after eval pseudo labels; ``--stream-ir-labels`` makes the IR labels during the CAM export).

``--list`` is the TRAINING list: its CAMs, IR labels and pseudo labels are scored against its masks (the WSSS
measure of pseudo-label quality), and the segmentation network (``experiments/<data>/deeplab.yaml``) trains on
its pseudo labels. The final mIoU is the network's on ``--seg-eval-list`` (default: the data set's held-out
split, synth ``val``, voc ``val``), whose images no earlier stage sees. ``--method ground_truth`` skips the WSSS
stages and trains the same network on the ground-truth masks of ``--list``: the upper bound of the recipe.

GSLM (``--method gslm``) trains in rounds: its first two stages are one, ``GSLM rounds`` (``lit-wsss gslm``
under ``<out>/gslm``: seeds and SLM training on ``--train-list`` (default: the data set's), ``--list`` scored
after every round), and the IRN stages start from the last round's CAMs of ``--list``.

Every stage is a function of :mod:`lit_wsss.stages` (the Lightning CLI's fit/predict, and the functions that
``eval-cam``, ``ir-labels`` and ``eval-seg`` wrap) with its own output folder under ``--out``; each stage reads
the manifest of the one before (style.md P8), so a stage can also be rerun by hand with its command. Finished stages are skipped on a rerun (their manifest / checkpoint exists). One summary line
per stage is printed, and ``<out>/pipeline.json`` collects them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from lit_wsss.io import write_json_atomic
from lit_wsss.refine.ir_labels import refinement_options
from lit_wsss.stages import (
    EXPERIMENTS,
    StageRecorder,
    configs,
    evaluate,
    evaluate_segmentation,
    export_cams,
    fit,
    ir_labels,
    method_files,
    predict,
    produced_classes,
    segment,
)

#: The held-out split the segmentation network is scored on, by data set (``--seg-eval-list``).
SEG_EVAL_LISTS = {"synth": "val", "voc": "val", "coco": "val2014", "folder": "val"}
#: ``--method`` that trains the segmentation network on ground-truth masks (no CAM stages).
GROUND_TRUTH = "ground_truth"


def training_mask_folder(root: Path) -> Path:
    """Ground-truth masks for training on the masks themselves: SegmentationClassAug when present (VOC's
    train_aug), else SegmentationClass."""
    from lit_wsss.datamodules.files import GT_FOLDERS

    for name in reversed(GT_FOLDERS):
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"no {' or '.join(GT_FOLDERS)} folder under {root}")


def same_list(root: Path, first: str, second: str) -> bool:
    """Whether two list arguments (names under the root or paths) name the same file."""
    from lit_wsss.datamodules.files import resolve_list

    try:
        return resolve_list(root, first).resolve() == resolve_list(root, second).resolve()
    except FileNotFoundError:
        return first == second


def final_cam_model(args: argparse.Namespace, out: Path, cam_args: list[str], rounds: int) -> tuple[list[str], Path]:
    """Arguments and checkpoint of the network whose CAMs the IRN stages refine (GSLM: its last SLM round)."""
    if args.method != "gslm":
        return cam_args, out / "cam" / "checkpoints" / "last.ckpt"
    from lit_wsss.gslm_rounds import final_slm

    return final_slm(args.data, args.root, args.cam_config, shlex.split(f"{args.cam_args} {args.slm_args}"),
                     out / "gslm", rounds)


def held_out_threshold(out: Path, cams: Path, args: argparse.Namespace, stage: StageRecorder,
                       model: tuple[list[str], Path], num_classes: int) -> None:
    """The held-out threshold mode: CAMs of ``--threshold-list`` (labelled, never trained on), the background
    threshold that scores best on THEIR masks, and the mIoU of ``--list`` at that threshold (read from the
    sweep of ``eval_cams.json``, which holds every threshold of the same sweep). Written to
    ``eval_cams_held_out.json``; a method with its own background (SIPE) has no threshold to choose."""
    from lit_wsss.scores import threshold_index

    result_path = out / "eval_cams_held_out.json"
    train_result = json.loads((out / "eval_cams.json").read_text())
    if train_result["mode"] == "bg_argmax":
        write_json_atomic(result_path, {"mode": "bg_argmax", "miou": None,
                                        "note": "own background: no threshold to choose"})
        return
    folder = out / "threshold_cams"
    model_args, checkpoint = model
    stage("CAMs (threshold list)", lambda: export_cams(model_args, checkpoint, args.threshold_list, folder),
          lambda: {"files": len(list(folder.glob("*.npz")))})
    chosen_path = out / "eval_cams_threshold_list.json"
    stage("eval CAMs (threshold list)", lambda: evaluate(folder, args.root, args.threshold_list, chosen_path,
                                                         num_classes, args.thresholds),
          lambda: {"chosen threshold": json.loads(chosen_path.read_text())["best"]["threshold"]})
    chosen = json.loads(chosen_path.read_text())["best"]["threshold"]
    index = threshold_index(chosen, train_result["thresholds"])
    if index is None:
        raise ValueError(f"threshold {chosen} chosen on {args.threshold_list} is not in the sweep of {out / 'eval_cams.json'}")
    record = {"mode": "held-out", "threshold": chosen, "chosen_on": args.threshold_list, "applied_to": args.list,
              "miou": train_result["miou"][index], "iou": train_result["iou"][index]}
    write_json_atomic(result_path, record)
    print(f"pipeline | held-out threshold {chosen:g} (chosen on {args.threshold_list}): "
          f"CAM mIoU {100 * record['miou']:.2f} on {args.list}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lit-wsss pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synth", help="experiments/<data>/ (synth or voc)")
    parser.add_argument("--method", default="cam", help="the CAM method: experiments/methods/<method>.yaml + experiments/<data>/<method>.yaml")
    parser.add_argument("--cam-config", action="append", default=[], help="extra config for the CAM stages")
    parser.add_argument("--irn-config", action="append", default=[], help="extra config for the IRNet stages")
    parser.add_argument("--root", required=True, help="VOC-layout root of the images and masks")
    parser.add_argument("--list", required=True,
                        help="the training ids: CAMs, IR labels, IRNet, pseudo labels (scored on their masks) and the "
                             "segmentation network's training labels")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="foreground classes for evaluation (default: the CAM model's, from its manifest)")
    parser.add_argument("--out", default=None, help="default outputs/pipeline/<data>-<method>")
    parser.add_argument("--workers", type=int, default=2, help="processes for the IR labels (CRF)")
    parser.add_argument("--cam-args", default="", help="extra lit-wsss arguments for CAM training and export")
    parser.add_argument("--irn-args", default="", help="extra lit-wsss arguments for IRNet training and inference")
    parser.add_argument("--encoder-args", default="",
                        help="extra lit-wsss arguments for a method's stage-A encoder (experiments/methods/"
                             "<method>_encoder.yaml, e.g. SLAMs)")
    parser.add_argument("--ir-args", default="",
                        help="extra ir-labels arguments, e.g. '--fg 0.5 --bg 0.2' (the background convention is "
                             "read from the CAM manifest)")
    parser.add_argument("--stream-ir-labels", action="store_true",
                        help="make the IR labels while the CAMs are exported (CAMWriter ir_labels: the CRF in "
                             "--workers processes beside the network); the IR-label stage then finds them done")
    parser.add_argument("--thresholds", default=None,
                        help="background thresholds swept by both evaluations, start:stop:step (eval-cam's default)")
    parser.add_argument("--gslm-rounds", type=int, default=None, help="GSLM: SLM rounds (default: the driver's 3)")
    parser.add_argument("--slm-args", default="", help="GSLM: extra lit-wsss arguments for the SLM rounds only")
    parser.add_argument("--train-list", default=None,
                        help="GSLM: ids whose seeds train the SLM (default: the data set's, voc train_aug)")
    parser.add_argument("--cams-only", action="store_true", help="stop after eval CAMs (no IR labels, IRNet)")
    parser.add_argument("--no-segmentation", action="store_true", help="stop after eval pseudo labels")
    parser.add_argument("--threshold-list", default=None,
                        help="labelled held-out ids: the CAM background threshold is chosen on their masks and "
                             "applied to --list (the 'held-out' threshold mode, beside fixed and oracle)")
    parser.add_argument("--seg-eval-list", default=None,
                        help="held-out ids the segmentation network is scored on (default: synth/voc val)")
    parser.add_argument("--seg-config", action="append", default=[], help="extra config for the segmentation stages")
    parser.add_argument("--seg-args", default="", help="extra lit-wsss arguments for segmentation training/prediction")
    args = parser.parse_args(argv)
    seg_eval_list = args.seg_eval_list or SEG_EVAL_LISTS.get(args.data, "val")
    if same_list(Path(args.root), seg_eval_list, args.list) and not (args.no_segmentation or args.cams_only):
        parser.error(f"--seg-eval-list equals --list ({args.list}): the final score needs held-out images "
                     "(or --no-segmentation)")
    data_args = [f"--data.init_args.root={args.root}"]
    try:  # the upper bound trains no CAM network
        cam_args = ([] if args.method == GROUND_TRUTH else
                    configs(args.data, args.method, args.cam_config) + data_args + shlex.split(args.cam_args))
    except FileNotFoundError as error:
        parser.error(f"--method {args.method}: {error}")
    out = Path(args.out or f"outputs/pipeline/{args.data}-{args.method}")
    out.mkdir(parents=True, exist_ok=True)
    try:
        ir_options = refinement_options(shlex.split(args.ir_args))
    except ValueError as error:
        parser.error(f"--ir-args: {error}")
    if args.stream_ir_labels and args.method == "gslm":
        parser.error("--stream-ir-labels: GSLM's CAMs come from its rounds (lit-wsss gslm), not from one export")
    irn_args = configs(args.data, "irn", args.irn_config) + data_args + shlex.split(args.irn_args)
    cams, ir_label_dir, pseudo = out / "cams", out / "ir_labels", out / "pseudo_labels"
    rounds = 0  # GSLM's SLM rounds
    if args.method == "gslm":  # the SLM trains on --train-list; --list is scored and refined
        from lit_wsss.gslm_rounds import NUM_ROUNDS, resolve_lists, scored_cams

        rounds = args.gslm_rounds if args.gslm_rounds is not None else NUM_ROUNDS
        seed_list, _ = resolve_lists(args.data, args.train_list, args.list)
        cams = scored_cams(out / "gslm", rounds - 1, seed_list, args.list)
    two_stage = bool(method_files(args.data, f"{args.method}_encoder"))
    encoder_args = ([*configs(args.data, f"{args.method}_encoder"), *data_args, *shlex.split(args.encoder_args)]
                    if two_stage else [])
    if two_stage:  # a method trained in two stages: its CAM network needs the encoder (SLAMs)
        cam_args.append(f"--model.init_args.encoder_checkpoint={out / 'encoder' / 'checkpoints' / 'last.ckpt'}")
    stage = StageRecorder(out / "pipeline.json", "pipeline")

    def miou(path: Path) -> dict[str, Any]:
        from lit_wsss.evaluation import headline

        scores = headline(json.loads(path.read_text()))
        line = {"mIoU": f"{100 * scores['own']:.2f} ({scores['own_rule']})"}
        if scores["best"] is not None:  # a method with its own background (SIPE) has no threshold
            line["oracle"] = f"{100 * scores['best']:.2f} ({scores['best_rule']})"
        return line

    checkpoints: dict[str, Path] = {}

    def num_classes() -> int:
        """The CAM model's class count: every evaluation of the chain uses it (the CAMs must exist)."""
        return args.num_classes or produced_classes(cams, "CAMs")

    def scored(folder: Path, result: Path) -> None:
        evaluate(folder, args.root, args.list, result, num_classes(), args.thresholds)

    seg_args = (configs(args.data, "deeplab", args.seg_config) + data_args
                + [f"--data.init_args.train_list={args.list}", f"--data.init_args.val_list={seg_eval_list}"]
                + shlex.split(args.seg_args))
    segmentation = out / "segmentation"

    def segmentation_stages(training_labels: Path) -> None:
        """Train the segmentation network on ``training_labels`` of ``--list``, predict and score the held-out list."""
        labelled = [*seg_args, f"--data.init_args.seed_dir={training_labels}"]
        # no validation while training: the held-out masks are used once, for the final score
        held_out = ["--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0"]
        stage("train segmentation", lambda: checkpoints.update(seg=fit(labelled + held_out, out / "deeplab")),
              lambda: {"checkpoint": str(checkpoints["seg"]), "training labels": str(training_labels)})
        stage("segment", lambda: segment(labelled, checkpoints["seg"], seg_eval_list, segmentation),
              lambda: {"files": len(list(segmentation.glob("*.png")))})
        stage("eval segmentation", lambda: evaluate_segmentation(
            segmentation, args.root, seg_eval_list, out / "eval_segmentation.json", args.num_classes),
              lambda: seg_miou(out / "eval_segmentation.json"))

    def seg_miou(path: Path) -> dict[str, Any]:
        result = json.loads(path.read_text())
        return {"mIoU": f"{100 * result['miou']:.2f} (held-out {seg_eval_list}, {result['num_images']} images)"}

    if args.method == GROUND_TRUTH:  # the upper bound: the same network on the masks of --list
        segmentation_stages(training_mask_folder(Path(args.root)))
        return 0

    if two_stage:
        stage("train encoder", lambda: checkpoints.update(encoder=fit(encoder_args, out / "encoder")),
              lambda: {"checkpoint": str(checkpoints["encoder"])})
    if args.method == "gslm":
        from lit_wsss.gslm_rounds import run_rounds

        stage("GSLM rounds", lambda: run_rounds(
            args.data, args.root, out / "gslm", train_list=seed_list, eval_list=args.list, rounds=rounds,
            workers=args.workers, config_files=args.cam_config, glm_args=shlex.split(args.cam_args),
            slm_args=shlex.split(f"{args.cam_args} {args.slm_args}")),
              lambda: {"files": len(list(cams.glob("*.npz")))})
    else:
        stage("train CAM", lambda: checkpoints.update(cam=fit(cam_args, out / "cam")),
              lambda: {"checkpoint": str(checkpoints["cam"])})
        # the IR-label options as CAMWriter(ir_labels=...) takes them (the convention, unless given, is the method's)
        stream_options = {"out_dir": str(ir_label_dir), "workers": args.workers,
                          **{name: value for name, value in ir_options.items() if value is not None}}
        stream = ([f"--trainer.callbacks.init_args.ir_labels={json.dumps(stream_options)}"]
                  if args.stream_ir_labels else [])
        stage("CAMs", lambda: export_cams(cam_args, checkpoints["cam"], args.list, cams, stream),
              lambda: {"files": len(list(cams.glob("*.npz")))})
    stage("eval CAMs", lambda: scored(cams, out / "eval_cams.json"), lambda: miou(out / "eval_cams.json"))
    if args.threshold_list:
        held_out_threshold(out, cams, args, stage, final_cam_model(args, out, cam_args, rounds), num_classes())
    if args.cams_only:
        return 0
    stage("IR labels", lambda: ir_labels(cams, args.root, args.list, ir_label_dir, args.workers, **ir_options),
          lambda: {"files": len(list(ir_label_dir.glob("*.png")))})
    stage("train IRNet", lambda: checkpoints.update(irn=fit(
        [*irn_args, f"--data.init_args.ir_label_dir={ir_label_dir}"], out / "irn")),
          lambda: {"checkpoint": str(checkpoints["irn"])})
    stage("pseudo labels", lambda: predict([
        *irn_args, "--config", str(EXPERIMENTS / "stages" / "pseudo_labels.yaml"),
        f"--data.init_args.cam_dir={cams}", f"--data.init_args.ir_label_dir={ir_label_dir}",
        f"--ckpt_path={checkpoints['irn']}"], pseudo),
          lambda: {"files": len(list(pseudo.glob("*.png")))})
    stage("eval pseudo labels", lambda: scored(pseudo, out / "eval_pseudo_labels.json"),
          lambda: miou(out / "eval_pseudo_labels.json"))
    if not args.no_segmentation:
        segmentation_stages(pseudo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
