"""The console progress sink: plain lines off a terminal, a rich live bar on one."""

from __future__ import annotations

import io

import pytest

from correction_rl.config import load_config
from correction_rl.observe.metrics import MetricSink
from correction_rl.observe.progress import ProgressSink, format_eta, progress_line


class Clock:
    """A settable clock, so rates and ETA are checked against exact numbers."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


EVAL = {"eval/greedy/accuracy": 0.22, "eval/greedy/correction_rate": 0.78,
        "eval/greedy/mean_edit_distance": 1.395, "eval/sampled/correction_rate": 0.88}


def step_metrics(loss: float, pairs: int = 16, **extra) -> dict[str, float]:
    return {"train/loss": loss, "train/margin": 0.5, "train/num_pairs": float(pairs),
            "rollout/tokens_per_s": 4000.0, "buffer/batch_staleness_mean": 0.5, **extra}


def test_plain_lines_with_rates_staleness_held_out_rate_and_eta():
    out, clock = io.StringIO(), Clock()
    sink = ProgressSink(total_steps=10, every=2, stream=out, clock=clock)
    assert isinstance(sink, MetricSink) and not sink.live  # a StringIO is not a terminal
    sink.log(EVAL, step=0)                 # the evaluation before training starts the clock
    clock.now += 4.0
    sink.log(step_metrics(0.69), step=1)   # every=2: no line for step 1
    clock.now += 4.0
    sink.log(step_metrics(0.60), step=2)
    sink.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "eval step 0 | greedy acc 0.220 corr 0.780 edit 1.395 | sampled corr 0.880"
    # 32 pairs in 8 s; 2 steps in 8 s, 8 steps left -> 32 s
    assert lines[1] == ("step 2/10 (20%) | loss 0.6000 | margin 0.500 | pairs/s 4.0 | tok/s 4000 | "
                        "staleness 0.50 | held-out corr 0.780 | ETA 32s")
    assert len(lines) == 2


def test_ray_driver_counts_are_preferred_and_eval_rate_is_kept_between_evaluations():
    out, clock = io.StringIO(), Clock()
    sink = ProgressSink(total_steps=200, stream=out, mode="lines", clock=clock)
    sink.log(EVAL, step=0)
    clock.now += 10.0
    metrics = step_metrics(0.5, **{"system/pairs_per_s": 12.5, "rollout/worker0/tokens": 900.0,
                                   "rollout/worker1/tokens": 100.0})
    del metrics["rollout/tokens_per_s"]
    sink.log(metrics, step=1)
    line = out.getvalue().splitlines()[-1]
    assert "pairs/s 12.5" in line          # all learner ranks, not rank 0's share
    assert "tok/s 100" in line             # 1000 cumulative tokens in 10 s
    assert "held-out corr 0.780" in line   # the last evaluation's value
    assert "ETA 33m10s" in line            # 199 steps at 10 s each


def test_live_mode_draws_a_rich_bar():
    out, clock = io.StringIO(), Clock()
    sink = ProgressSink(total_steps=4, stream=out, mode="live", clock=clock)
    sink.log(EVAL, step=0)
    for step in (1, 2):
        clock.now += 1.0
        sink.log(step_metrics(0.6), step=step)
    sink.close()
    text = out.getvalue()
    assert "\x1b[" in text                          # terminal control codes: a live display
    assert "2/4" in text and "ETA 2s" in text        # the bar: M/N and the ETA
    assert "step 2/4 (50%) | loss 0.6000" in text    # the line printed above it
    assert "held-out corr 0.780" in text


def test_eta_format_and_mode_validation():
    assert [format_eta(s) for s in (None, 5.4, 65, 3725)] == ["?", "5s", "1m05s", "1h02m"]
    with pytest.raises(ValueError, match="metrics.progress"):
        ProgressSink(10, mode="fancy")


def test_the_run_config_builds_the_progress_sink(tmp_path):
    from correction_rl.run.components import build_sink

    cfg = load_config(None, {"output_dir": str(tmp_path), "total_steps": 7,
                             "metrics": {"wandb_mode": "disabled", "progress": "lines"}})
    sink = build_sink(cfg, tmp_path)
    progress = [s for s in sink.sinks if isinstance(s, ProgressSink)]
    assert len(progress) == 1 and progress[0].tracker.total_steps == 7 and not progress[0].live
    sink.close()
    assert progress_line(progress[0].tracker.update({}, 0)).startswith("step 0/7 (0%)")
