"""evaluation.headline: what the pipeline, gslm and benchmark tables read from an eval-cam result."""

import pytest


def test_headline_reads_the_own_rule_and_the_oracle():
    from lit_wsss.evaluation import headline

    swept = {"mode": "sweep", "fixed": {"miou": 0.30, "threshold": 0.15, "iou": [0.9, 0.1]},
             "best": {"miou": 0.35, "threshold": 0.27, "iou": [0.8, 0.3]}}
    assert headline(swept) == {"own": 0.30, "own_rule": "tau = 0.15", "best": 0.35, "best_rule": "tau = 0.27",
                               "iou": [0.8, 0.3], "own_fg": None, "gt_fg": None}
    own_bg = {"mode": "bg_argmax", "fixed": None, "best": None, "bg_argmax": {"miou": 0.31, "iou": [0.7, 0.2]}}
    assert headline(own_bg) == {"own": 0.31, "own_rule": "argmax with its own bg", "best": None, "best_rule": None,
                                "iou": [0.7, 0.2], "own_fg": None, "gt_fg": None}
    # ground truth: 6 bg + 4 fg pixels; predicted: 2 of the bg pixels as fg, 1 fg pixel as bg -> 5 fg of 10
    own_bg["bg_argmax"]["confusion"] = [[4, 2], [1, 3]]
    scores = headline(own_bg)
    assert scores["own_fg"] == pytest.approx(0.5) and scores["gt_fg"] == pytest.approx(0.4)
