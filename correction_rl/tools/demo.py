"""``correction-rl demo``: what ``make demo`` runs.

Warm-starts a tiny policy on the configured task when ``model.path`` (``artifacts/policy-reverse``)
is missing (a model that is right on 30-60% of held-out prompts, so it needs correcting often
but not always), then runs ``configs/demo.yaml`` on a local Ray cluster: HF rollouts, the oracle
teacher, the DeepSpeed learner on CPU, W&B offline, and ends with the before/after table of
held-out correction metrics.

``make demo CONFIG=configs/freeform_demo.yaml`` runs the free-form demo instead: it first builds
its two models (``tools/freeform.py``: the weak spelling policy and the vLLM teacher trained on
its correction request, ~10 minutes on 2 cores) when they are missing, then trains the policy on
the LLM teacher's corrections alone (docs/models.md, "A free-form task").
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # correction_rl/tools/demo.py -> the checkout


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="correction-rl demo", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    args, overrides = parser.parse_known_args(argv)

    from correction_rl.config import load_config
    from correction_rl.train import run_training
    from correction_rl.tools.warmstart import WarmStartConfig, warm_start

    cfg = load_config(args.config, overrides)
    policy = Path(cfg.model.path)
    if cfg.task.names == ["spelling"] and cfg.teacher.kind == "vllm":
        _make_freeform_models(policy, Path(cfg.teacher.vllm.model_path or ""))
    elif not (policy / "warmstart.json").exists():
        print(f"warm-starting a tiny {cfg.task.names[0]} policy into {policy} ...")
        result = warm_start(WarmStartConfig(task=cfg.task.names[0], seed=cfg.seed), policy)
        print(f"warm start: held-out accuracy {result.accuracy:.1%} after {result.steps} steps "
              f"({result.seconds:.0f} s)")
    if cfg.run_dir.exists():  # the demo always trains from scratch; keep one previous run
        previous = cfg.run_dir.with_name(cfg.run_dir.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        cfg.run_dir.rename(previous)
        print(f"moved the previous demo run to {previous}")
    result = run_training(cfg)
    print(result.comparison_table())
    print(f"run directory: {result.run_dir}")
    return 0


def _make_freeform_models(policy: Path, teacher: Path) -> None:
    """The free-form demo's policy and teacher, made together into one directory when missing
    (they belong together: the teacher is trained on samples of this policy)."""
    from correction_rl.errors import UserError
    from correction_rl.tools.freeform import make_models

    out = policy.parent
    if (policy, teacher) != (out / "policy", out / "teacher"):
        raise UserError(f"the free-form demo makes its models as DIR/policy and DIR/teacher; got model.path={policy} "
                        f"and teacher.vllm.model_path={teacher} (configs/freeform_demo.yaml has the layout)")
    if (out / "freeform.json").exists() and (policy / "config.json").exists() and (teacher / "config.json").exists():
        return
    print(f"making the free-form demo's policy and teacher in {out} (about 10 minutes on 2 cores) ...")
    record = make_models(out)
    print(f"teacher held-out accuracy {record['teacher']['held_out']['accuracy']:.1%}, "
          f"policy {record['policy']['held_out_accuracy']:.1%}")
