"""Where a run executes (``resources``), how it survives (``checkpoint``), and ``RunConfig``,
the whole run: one field per section plus the run's identity."""

from __future__ import annotations

from dataclasses import field
from pathlib import Path
from typing import Literal

from correction_rl.config.rules import Count, NonNegFloat, NonNegInt, ObjectStoreMB, PosFloat, section
from correction_rl.config.sections import (
    BufferConfig,
    EvalConfig,
    LearnerConfig,
    MetricsConfig,
    ModelConfig,
    ObjectiveConfig,
    RolloutConfig,
    SyncConfig,
    TaskConfig,
)
from correction_rl.config.teacher import TeacherConfig


@section
class ResourcesConfig:
    ray_address: str | None = None
    """Ray cluster to join; None starts a local one (or uses ``RAY_ADDRESS``)."""
    object_store_mb: ObjectStoreMB | None = None
    """Object store of the local Ray this run starts, in MB (None: Ray's default, 30% of the
    memory; ignored when joining a cluster). A store a few times the policy's size lets the
    object-store weight sync reuse its pages instead of faulting fresh ones in every version:
    export + sync fell from 3.6x to ~1.1x a raw copy of a 103 MB model (docs/benchmarks.md)."""
    num_rollout_workers: Count = 1
    """Rollout actors, each holding one generation engine."""
    num_teacher_workers: Count = 1
    """Teacher actors."""
    num_learner_ranks: Count = 1
    """Learner data-parallel ranks (one Ray actor each)."""
    cpus_per_rollout_worker: NonNegFloat = 1.0
    """CPUs reserved per rollout actor."""
    cpus_per_teacher_worker: NonNegFloat = 0.5
    """CPUs reserved per teacher actor."""
    cpus_per_learner_rank: NonNegFloat = 1.0
    """CPUs reserved per learner rank."""
    gpus_per_rollout_worker: NonNegFloat = 0.0
    """GPUs per rollout actor (fractions allow colocating with the learner)."""
    gpus_per_teacher_worker: NonNegFloat = 0.0
    """GPUs per teacher actor."""
    gpus_per_learner_rank: NonNegFloat = 0.0
    """GPUs per learner rank."""
    learner_resource: str | None = None
    """Custom Ray resource a node must advertise to host learner ranks (pins the role to nodes)."""
    rollout_resource: str | None = None
    """Custom Ray resource a node must advertise to host rollout workers."""
    teacher_resource: str | None = None
    """Custom Ray resource a node must advertise to host teacher workers."""
    custom_resource_amount: PosFloat = 0.01
    """Amount of ``*_resource`` each actor takes: 0.01 makes it a tag (up to 100 actors per unit a
    node advertises); 1 makes it a slot count (a node with ``{"rollout": 2}`` hosts 2 workers)."""
    learner_labels: dict[str, str] = field(default_factory=dict)
    """Node labels (``ray start --labels k=v``) a node must carry to host learner ranks: Ray label
    selectors, e.g. ``{accelerator: H100}`` or ``{zone: "in(a,b)"}`` (docs/cluster.md)."""
    rollout_labels: dict[str, str] = field(default_factory=dict)
    """Node labels a node must carry to host rollout workers."""
    teacher_labels: dict[str, str] = field(default_factory=dict)
    """Node labels a node must carry to host teacher workers."""
    placement: Literal["pack", "spread"] = "pack"
    """Placement-group strategy: pack roles onto few nodes (colocated) or spread them."""
    placement_timeout_s: PosFloat = 60.0
    """Fail, naming the missing resources, if the actors cannot be placed within this time."""
    start_timeout_s: PosFloat = 600.0
    """Fail if the actors (engines, learner rendezvous) are not constructed within this time."""
    call_timeout_s: PosFloat = 600.0
    """Upper bound of any single remote call the driver waits on (a learner step, a sample)."""
    max_actor_restarts: NonNegInt = 3
    """Ray restarts of a dead rollout or teacher actor before the run fails."""
    engine_stall_timeout_s: PosFloat = 600.0
    """Health check (Ray modes): a rollout worker whose engine died, or whose current generation
    or weight load has run longer than this, is killed by the driver and restarted by Ray with a
    new engine (docs/reliability.md). Set it well above the slowest normal generation batch."""
    max_inflight_batches: Count = 2
    """Batches a rollout worker may have waiting at the teachers (async mode back-pressure)."""


@section
class CheckpointConfig:
    every_steps: NonNegInt = 10
    """Write a checkpoint every n learner steps (0: only at exit); one is always written at the
    end of the run and when SIGINT/SIGTERM stops it (docs/reliability.md)."""
    keep: Count = 2
    """Checkpoints kept under ``<run_dir>/checkpoints`` (the newest); older ones are deleted.
    Keep >= 2 so a corrupted newest checkpoint can fall back to the previous one."""
    resume: Literal["auto", "never"] = "auto"
    """``auto``: if the run directory holds a valid checkpoint, continue from it (the config
    must agree in the fields resuming depends on); ``never``: start from step 0 even if
    checkpoints exist; what happens to an existing non-empty run directory then is
    ``on_existing``."""
    on_existing: Literal["refuse", "overwrite", "move_aside"] = "refuse"
    """What a run that starts at step 0 (``resume: never``, or ``auto`` with no checkpoint to
    resume) does with a run directory that already holds files (an old correction log,
    checkpoints, metrics): ``refuse`` (the default: the run stops before writing anything, naming
    the directory and these choices), ``overwrite`` (its contents are deleted first), or
    ``move_aside`` (its contents move into a sibling ``<name>.old-<YYYYmmdd-HHMMSS>/``, printed;
    the directory itself stays, since it holds the run's lock). A clean run
    never mixes with an old one: an old log's pair ids would otherwise be taken as already
    corrected and their rollouts silently dropped, and ``metrics.jsonl`` would get a second
    step 0."""


@section
class RunConfig:
    name: str = "run"
    """Run name; outputs go to ``<output_dir>/<name>``."""
    output_dir: str = "runs"
    """Parent directory of run directories (a shared path on clusters)."""
    seed: NonNegInt = 0
    """Seed of prompts, sampling and initialisation."""
    mode: Literal["async", "sync", "inprocess"] = "async"
    """``async``: Ray actors, generation, correction and learning concurrently; ``sync``: Ray
    actors in lockstep (generate -> correct -> train); ``inprocess``: one process, no Ray (the
    reference algorithm, tests, debugging)."""
    total_steps: Count = 50
    """Learner steps to run."""
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name
