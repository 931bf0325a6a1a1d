"""`lit-wsss benchmark` (issues 7, 14), its small variant: every method under one budget file on a few synthetic
images, one short training each, through CAMs, IRN, the segmentation network and every evaluation (fixed,
held-out and oracle thresholds, held-out segmentation, the ground-truth upper bound, seeds) into one results
file."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lit_wsss.benchmark import METHODS, main, pipeline_args, read_budget, run_method, section_args, split_ids
from lit_wsss.datamodules.synthetic import generate_synthetic_voc

BUDGETS = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "budgets").glob("*.yaml"))

TINY_BUDGET = {
    "seed": 0, "list": "train", "split": {"train": 0.75}, "sweep": "0.0:1.2:0.1", "ir_workers": 1,
    "ground_truth": True, "cam": {"seeds": [0, 1]},
    "segmentation": {"data": {"crop_size": 64, "batch_size": 4},
                     "model": {"backbone": "resnet18", "pretrained": None, "output_stride": 16,
                               "inference_scales": [1.0]},
                     "trainer": {"max_steps": 2}},
    "data": {"num_train": 8, "num_val": 4, "generator_seed": 7, "crop_size": 64, "batch_size": 4, "num_workers": 0},
    "model": {"backbone": "resnet18", "pretrained": None},
    "cam_model": {"cam_scales": [1.0]},
    "trainer": {"max_steps": 2, "limit_val_batches": 1},
    "irn": {"data": {"crop_size": 96, "batch_size": 4, "num_workers": 0},
            "model": {"backbone": "resnet18", "pretrained": None, "crop_size": 96}, "trainer": {"max_steps": 2}},
    "gslm": {"rounds": 1, "slm_model": {"pool_size": 4}},
    "slams": {"encoder_model": {"se_size": 32}, "cam_model": {"encoder_backbone": "resnet18", "se_size": 32}},
}


def test_section_args_and_budget_errors(tmp_path):
    assert section_args("data.init_args", {"resize_long": [192, 384], "cls_labels": None, "list": "train"}) == [
        "--data.init_args.resize_long=[192,384]", "--data.init_args.cls_labels=null", "--data.init_args.list=train"]
    with pytest.raises(FileNotFoundError, match="nothere.yaml"):
        read_budget(tmp_path / "nothere.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\n")
    with pytest.raises(ValueError, match=r"unknown keys \['epochs'\]"):
        read_budget(bad)


@pytest.mark.parametrize("path", BUDGETS, ids=lambda p: p.name)
def test_shipped_budgets_parse_into_every_stage(path, monkeypatch, capsys):
    """Every key of a shipped budget is an argument the CLI accepts, in the stages that get it (SLAMs: its
    encoder and CAM network; GSLM: its SLM; every method's IRNet and segmentation network)."""
    import shlex

    from lit_wsss.cli import main as cli_main
    from lit_wsss.stages import configs

    monkeypatch.setattr(sys, "argv", ["lit-wsss"])
    budget = read_budget(path)
    assert set(budget.get("methods") or METHODS) <= set(METHODS)
    for method, flag, config in [("slams", "--cam-args=", "slams"), ("slams", "--encoder-args=", "slams_encoder"),
                                 ("gslm", "--slm-args=", "gslm"), ("cam", "--irn-args=", "irn"),
                                 ("cam", "--seg-args=", "deeplab")]:
        args = pipeline_args(method, budget, "voc", "root", "out")
        extra = shlex.split(next(a for a in args if a.startswith(flag))[len(flag):])
        if flag == "--slm-args=":
            extra = shlex.split(next(a for a in args if a.startswith("--cam-args="))[len("--cam-args="):]) + extra
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["fit", *configs("voc", config), *extra, "--print_config"])
        assert exit_info.value.code in (None, 0), (method, flag, capsys.readouterr().err[-2000:])
        capsys.readouterr()


def test_a_failed_method_keeps_its_time_for_the_rerun(tmp_path):
    """A pipeline that fails still records its seconds; the next attempt adds its own to them."""
    out = tmp_path / "run"
    for attempt in (1, 2):
        with pytest.raises(RuntimeError, match=r"cam \(seed 0\): lit-wsss pipeline failed .*pipeline.log"):
            run_method("cam", {"trainer": {"max_steps": 1}}, "voc", tmp_path / "no-such-root", out)
        seconds = json.loads((out / "cam" / "seed0" / "benchmark.json").read_text())["seconds"]
        if attempt == 1:
            first = seconds
    assert 0 < first < seconds
    assert "no-such-root" in (out / "cam" / "seed0" / "pipeline.log").read_text()


def test_split_is_deterministic_even_and_disjoint():
    ids = [f"2008_{i:06d}" for i in range(600)][::-1]  # any order in: sorted ids out
    train, evaluation = split_ids(ids, 0.8)
    assert len(train) == 480 and len(evaluation) == 120 and not set(train) & set(evaluation)
    assert evaluation[:3] == ["2008_000004", "2008_000009", "2008_000014"]  # every fifth sorted id
    assert split_ids(list(reversed(ids)), 0.8) == (train, evaluation)
    with pytest.raises(ValueError, match="empty"):
        split_ids(["a", "b"], 0.9)


def test_every_method_gets_the_same_budget():
    """The shared sections reach every method; method sections only their own method."""
    args = {m: pipeline_args(m, TINY_BUDGET, "synth", "root", "out") for m in METHODS}
    for method, values in args.items():
        cam = next(a for a in values if a.startswith("--cam-args="))
        assert "--model.init_args.backbone=resnet18" in cam and "--trainer.max_steps=2" in cam
        assert "--seed_everything=0" in cam and "--data.init_args.crop_size=64" in cam
        assert ("--model.init_args.encoder_backbone=resnet18" in cam) == (method == "slams")
        assert ("--gslm-rounds" in values) == (method == "gslm")
        assert "--thresholds=0.0:1.2:0.1" in values
    # GSLM's seeds come from the budget's training list, not the data set's default (voc: train_aug)
    gslm = pipeline_args("gslm", {**TINY_BUDGET, "data": {"train_list": "train"}}, "voc", "root", "out")
    assert gslm[gslm.index("--train-list") + 1] == "train"


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_small_benchmark_cams_only_chooses_the_threshold_on_the_held_out_part(tmp_path, monkeypatch, capsys):
    """The default suite's share of the benchmark (the whole chain is test_small_benchmark_end_to_end, slow):
    one baseline run, CAMs only. The threshold is the best of the sweep on the 2 held-out ids and is then
    scored on the 6 training ids."""
    monkeypatch.setattr(sys, "argv", ["lit-wsss"])
    root = generate_synthetic_voc(tmp_path / "synthetic", num_train=8, num_val=4, seed=7)
    budget = tmp_path / "budget.yaml"
    budget.write_text(yaml.safe_dump({**TINY_BUDGET, "ground_truth": False, "cam": {"seeds": [0]}}))
    results, out = tmp_path / "results.md", tmp_path / "run"
    assert main(["--data", "synth", "--root", str(root), "--budget", str(budget), "--results", str(results),
                 "--out", str(out), "--methods", "cam", "--cams-only"]) == 0
    assert not list(out.glob("*/*/irn")) and results.read_text().count("- (not run: --cams-only)") == 1
    train_part = (out / "lists" / "train_part.txt").read_text().split()
    eval_part = (out / "lists" / "eval_part.txt").read_text().split()
    assert len(train_part) == 6 and len(eval_part) == 2 and not set(train_part) & set(eval_part)
    folder = out / "cam" / "seed0"
    cams = json.loads((folder / "eval_cams.json").read_text())
    chosen = json.loads((folder / "eval_cams_threshold_list.json").read_text())
    held = json.loads((folder / "eval_cams_held_out.json").read_text())
    assert cams["num_images"] == 6 and chosen["num_images"] == 2
    assert cams["thresholds"][-1] == pytest.approx(1.2)  # the budget's sweep
    assert held["threshold"] == chosen["best"]["threshold"]
    assert held["miou"] == cams["miou"][cams["thresholds"].index(held["threshold"])]


@pytest.mark.slow  # about 4.5 minutes on 2 cores (5 pipeline runs of subprocesses); `make test-all` runs it
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_small_benchmark_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lit-wsss"])
    root = generate_synthetic_voc(tmp_path / "synthetic", num_train=8, num_val=4, seed=7)
    budget = tmp_path / "budget.yaml"
    budget.write_text(yaml.safe_dump(TINY_BUDGET))
    results, out = tmp_path / "results.md", tmp_path / "run"
    # cam (two seeds), sipe (its own background: no threshold) and gslm (rounds: its last SLM makes the held-out
    # CAMs) cover the wiring; cpn and vwe add none, slams' pre-stage runs in test_pipeline.py and its budget
    # sections are parsed by test_shipped_budgets_parse_into_every_stage (kept out: 40 s of a 10-minute suite)
    methods = ["cam", "sipe", "gslm"]
    argv = ["--data", "synth", "--root", str(root), "--budget", str(budget), "--results", str(results),
            "--out", str(out), "--methods", ",".join(methods)]
    runs = [(m, s) for m in methods for s in ((0, 1) if m == "cam" else (0,))]
    # CAMs only first: no IRN stage runs, the pseudo-label column says so
    assert main([*argv, "--cams-only"]) == 0
    assert not list(out.glob("*/*/eval_pseudo_labels.json")) and not list(out.glob("*/*/irn"))
    assert results.read_text().count("- (not run: --cams-only)") == len(methods)
    cams_only_seconds = {run: json.loads((out / run[0] / f"seed{run[1]}" / "benchmark.json").read_text())["seconds"]
                         for run in runs}
    trained = {path: path.stat().st_mtime_ns for path in out.rglob("cam/checkpoints/last.ckpt")}
    assert len(trained) == 3  # cam seeds 0 and 1, sipe (GSLM trains in its round folders)
    # the split: 6 training ids (CAMs, IR labels, IRNet, segmentation), 2 held-out ids (thresholds, final score)
    train_part = (out / "lists" / "train_part.txt").read_text().split()
    eval_part = (out / "lists" / "eval_part.txt").read_text().split()
    assert len(train_part) == 6 and len(eval_part) == 2 and not set(train_part) & set(eval_part)
    # the full run goes on from the scored CAMs and adds its time to theirs
    assert main(argv) == 0
    text = results.read_text()
    rows = [line for line in text.splitlines() if re.match(r"\| (cam|sipe|cpn|vwe|gslm|slams) \| \d", line)]
    assert [row.split("|")[1].strip() for row in rows] == methods
    for method, seed in runs:
        folder = out / method / f"seed{seed}"
        cams = json.loads((folder / "eval_cams.json").read_text())
        pseudo = json.loads((folder / "eval_pseudo_labels.json").read_text())
        segmentation = json.loads((folder / "eval_segmentation.json").read_text())
        assert cams["num_images"] == 6 and segmentation["num_images"] == 2
        assert cams["mode"] == "bg_argmax" or cams["thresholds"][-1] == pytest.approx(1.2)  # the budget's sweep
        held = json.loads((folder / "eval_cams_held_out.json").read_text())
        if cams["mode"] != "bg_argmax":  # the threshold chosen on the 2 held-out images, scored on the 6
            chosen = json.loads((folder / "eval_cams_threshold_list.json").read_text())
            assert chosen["num_images"] == 2 and held["threshold"] == chosen["best"]["threshold"]
            assert held["miou"] == cams["miou"][cams["thresholds"].index(held["threshold"])]
        assert json.loads((folder / "benchmark.json").read_text())["seconds"] > cams_only_seconds[(method, seed)]
        if seed:
            continue
        row = next(r for r in rows if r.startswith(f"| {method} |")).split("|")
        if method != "cam":  # one seed: the values themselves (cam's two seeds: mean +- std, below)
            own_pseudo = pseudo["bg_argmax"]["miou"] if pseudo["mode"] == "bg_argmax" else pseudo["fixed"]["miou"]
            assert row[5].strip().startswith(f"{100 * own_pseudo:.2f}")
            own = cams["bg_argmax"]["miou"] if cams["mode"] == "bg_argmax" else cams["fixed"]["miou"]
            assert row[2].strip().startswith(f"{100 * own:.2f}")
            assert row[6].strip() == f"{100 * segmentation['miou']:.2f}"
            assert row[3].strip() == ("- (own background)" if cams["mode"] == "bg_argmax" else
                                      f"{100 * held['miou']:.2f} (tau = {held['threshold']:g})")
        shares = []
        for result in (cams, pseudo):  # foreground share: predicted columns 1.. and ground-truth rows 1..
            own_block = result["bg_argmax"] if result["mode"] == "bg_argmax" else result["fixed"]
            confusion = np.array(own_block["confusion"], dtype=float)
            shares.append((confusion[:, 1:].sum() / confusion.sum(), confusion[1:].sum() / confusion.sum()))
        assert shares[0][1] == pytest.approx(shares[1][1])  # the same masks under both
        assert row[7].strip() == f"{100 * shares[0][0]:.0f} % / {100 * shares[1][0]:.0f} % ({100 * shares[0][1]:.0f} %)"
    # two seeds of the baseline: mean +- sample standard deviation, worked out here from the two folders
    values = [100 * json.loads((out / "cam" / f"seed{s}" / "eval_segmentation.json").read_text())["miou"] for s in (0, 1)]
    mean, std = np.mean(values), np.std(values, ddof=1)
    cam_row = next(r for r in rows if r.startswith("| cam |")).split("|")
    assert cam_row[6].strip() == f"{mean:.2f} ± {std:.2f} (n=2)"
    # the upper bound: the same network on the masks of the training part
    upper = next(line for line in text.splitlines() if line.startswith("| segmentation trained on ground truth"))
    truth = json.loads((out / "ground_truth" / "seed0" / "eval_segmentation.json").read_text())
    assert upper.split("|")[6].strip() == f"{100 * truth['miou']:.2f}" and truth["num_images"] == 2
    assert {path: path.stat().st_mtime_ns for path in trained} == trained  # no CAM network trained again
    assert results.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "oracle" in text and "| background |" in text and "--cams-only" not in text.split("| method |")[1]
    # a rerun resumes: nothing runs again, the same table comes back
    before = {run: (out / run[0] / f"seed{run[1]}" / "benchmark.json").read_text() for run in runs}
    assert main(argv) == 0
    assert {run: (out / run[0] / f"seed{run[1]}" / "benchmark.json").read_text() for run in runs} == before
    # another session keeps only the repository: the run records beside the results rebuild the same table and
    # nothing trains again; a record made under another budget is not taken
    records = tmp_path / "results-runs"
    assert sorted(p.name for p in records.glob("*.json")) == sorted(
        [f"{m}-seed{s}.json" for m, s in runs] + ["ground_truth-seed0.json"])
    table = [line for line in text.splitlines() if line.startswith("| ")]
    import shutil
    shutil.rmtree(out)
    assert main(argv) == 0
    assert [line for line in results.read_text().splitlines() if line.startswith("| ")] == table
    assert sorted(p.name for p in out.iterdir()) == ["lists"]
    stale = json.loads((records / "sipe-seed0.json").read_text())
    (records / "sipe-seed0.json").write_text(json.dumps({**stale, "fingerprint": "another budget"}))
    assert main([*argv, "--methods", "sipe", "--cams-only"]) == 0
    assert (out / "sipe" / "seed0" / "eval_cams.json").is_file()


def test_results_of_a_benchmark_stopped_part_way(tmp_path):
    """A row with no finished run says so; the table is still written (the benchmark rewrites it after every
    run, so that a run spread over several sessions always has its table)."""
    from lit_wsss.benchmark import write_results

    results = tmp_path / "results.md"
    write_results(tmp_path / "run", ["cam", "ground_truth"], results, ["# partial"], {"cam": [0], "ground_truth": [0]})
    text = results.read_text()
    assert "| cam | - (not run yet) |" in text and "| segmentation trained on ground truth (upper bound) | -" in text
    header = next(line for line in text.splitlines() if line.startswith("| method |"))
    row = next(line for line in text.splitlines() if line.startswith("| cam |"))
    assert row.count("|") == header.count("|")
