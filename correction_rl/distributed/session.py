"""A Ray run as a lifecycle ``Session`` (``run/lifecycle.py``): the cluster, the step loop
(``driver.py``) and the few things only a Ray run does around it (actor placement record,
shutting the actors down).

The lifecycle owns the rest, the same in every mode: the run directory's lock, choosing the
checkpoint, evaluation before and after, the metric sink, the final policy and checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from correction_rl.config import RunConfig
from correction_rl.distributed.calls import get_within, while_restarting
from correction_rl.distributed.cluster import Cluster, describe_placement, init_ray, start_cluster
from correction_rl.distributed.driver import Driver
from correction_rl.distributed.settings import check_settings
from correction_rl.run.checkpoint import Checkpoint
from correction_rl.prompts.split import train_and_held_out
from correction_rl.run.evaluation import EvalReport
from correction_rl.run.lifecycle import RunResult, run_session
from correction_rl.run.state import ResumeReport


class RaySession:
    """One Ray run: a started cluster and the driver over it."""

    def __init__(self, cfg: RunConfig, cluster: Cluster, eval_prompts) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.driver = Driver(cfg, cluster, eval_prompts)

    @property
    def version(self) -> int:
        return self.driver.version

    def evaluate(self) -> EvalReport:
        return self.driver.evaluate()

    def restore(self, ckpt: Checkpoint) -> ResumeReport:
        """Load ``ckpt`` into the freshly started actors, then push the restored weights out."""
        state, report = self.driver.checkpoints.restore(ckpt)
        self.driver.version = state.version
        self.driver.pairs_trained = state.pairs_trained
        self.driver.sync_weights()
        return report

    def train(self, sink, resume: ResumeReport | None, wandb_run_id: str | None) -> None:
        self.driver.train(sink, resume, wandb_run_id)

    def save_policy(self, path: Path) -> None:
        """The policy (every rank takes part: under ZeRO-3 the weights are gathered), and where
        each actor ran (``roles.json``, read by the multi-node placement checks)."""
        get_within([r.save_pretrained.remote(str(path)) for r in self.cluster.learners],
                   self.driver.timeout, "save")
        roles = while_restarting(lambda: describe_placement(self.cluster), "actor placement",
                                 self.cfg.resources.start_timeout_s)
        (self.cfg.run_dir / "roles.json").write_text(json.dumps(roles, indent=2) + "\n")

    def write_checkpoint(self, wandb_run_id: str | None) -> Path:
        return self.driver.write_checkpoint(wandb_run_id)

    def close(self) -> None:
        try:
            self.driver.syncer.close()
        finally:
            self.cluster.shutdown()


def start(cfg: RunConfig) -> RaySession:
    """Start (or join) Ray, place the actors and wait until they are up."""
    train_prompts, eval_prompts = train_and_held_out(cfg)
    init_ray(cfg)
    cluster = start_cluster(cfg, train_prompts)
    try:
        return RaySession(cfg, cluster, eval_prompts)
    except BaseException:
        cluster.shutdown()
        raise


def run(cfg: RunConfig) -> RunResult:
    """A whole Ray run: settings checked before anything starts, then the shared lifecycle."""
    check_settings(cfg)
    return run_session(cfg, lambda run_dir: start(cfg))
