"""The actor classes: thin shells around the plain components, made remote in ``cluster.py``.

Each shell owns one component and adds only what being an actor needs: a lock where a method may
run concurrently with another (threaded actors), the long-running producer loop of async mode,
busy-time accounting for the idle fraction of each role, and the process id (fault tests).

Data never goes through the driver in async mode: rollout workers hand batches of rollouts to
teacher workers, which push pairs straight into the buffer actor.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Sequence

import ray

from correction_rl.buffer.replay import ReplayBuffer
from correction_rl.run.components import (
    buffer_config,
    build_eval_teacher,
    build_generator,
    build_teacher,
    rollout_sampling,
)
from correction_rl.config import RunConfig
from correction_rl.buffer.correction_log import CorrectionLog
from correction_rl.prompts.handoffs import HandoffLedger
from correction_rl.prompts.stream import PromptStream
from correction_rl.rollout.base import EngineUnhealthy
from correction_rl.types import CorrectionPair, Prompt, Rollout, StepStats, WeightUpdate


class RestartedWorker(RuntimeError):
    """A restarted rollout worker was asked for prompts or an evaluation before the driver gave
    it back its predecessor's stream position and the current weights, or for its stream
    position before that was restored."""


class BusyClock:
    """Fraction of wall time a role spent working (``1 - idle fraction``)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.busy = 0.0

    def add(self, seconds: float) -> None:
        self.busy += seconds

    def idle_fraction(self) -> float:
        wall = time.perf_counter() - self.started
        return max(0.0, 1.0 - self.busy / wall) if wall > 0 else 0.0


class RolloutWorker:
    """Holds one generation engine and its own shard of the prompt stream."""

    def __init__(self, cfg: RunConfig, worker_id: int, prompts: Sequence[Prompt]):
        self.cfg = cfg
        self.worker_id = worker_id
        self.generator = build_generator(cfg, seed_offset=worker_id)
        self.stream = PromptStream(prompts, seed=cfg.seed * 1000 + worker_id)
        self.lock = threading.Lock()  # generation and weight loading never overlap
        self.stop_event = threading.Event()
        self.clock = BusyClock()
        self.calls = 0
        self.tokens = 0
        self.init_model = None  # loaded on first evaluation (KL reference)
        self.eval_teacher = None  # built on first evaluation (eval.teacher)
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.awaiting_stream = restarted
        """A process Ray restarted draws no prompt until the driver has given it its
        predecessor's stream position (``load_state_dict``): a fresh stream would repeat prompts."""
        self.awaiting_weights = restarted
        """... nor generates or evaluates before it has loaded the current weights: its engine
        starts from the initial ones."""
        self.busy_since: float | None = None
        """When the running ``generate`` / ``load_weights`` started (None: idle); a call that
        runs far longer than any should means a stuck engine (``health``)."""

    def pid(self) -> int:
        return os.getpid()

    def health(self) -> dict[str, Any]:
        """Lock-free (it must answer while a generation runs): the process id (a new one means
        Ray restarted this actor), the engine's own verdict (``check_health``: None = serving),
        and how long the current engine call has been running."""
        busy = self.busy_since
        return {
            "pid": os.getpid(),
            "engine_problem": self.engine_problem(),
            "busy_for_s": 0.0 if busy is None else time.monotonic() - busy,
        }

    def engine_problem(self) -> str | None:
        check = getattr(self.generator, "check_health", None)
        return check() if callable(check) else None

    def _raise_if_unhealthy(self) -> None:
        problem = self.engine_problem()
        if problem is not None:
            raise EngineUnhealthy(f"rollout worker {self.worker_id} cannot load weights: {problem}")

    @contextlib.contextmanager
    def engine_call(self):
        """Marks an engine call (generation, weight load) for the stall check (``health``)
        and the busy clock (idle fraction)."""
        start = time.perf_counter()
        self.busy_since = time.monotonic()
        try:
            yield
        finally:
            self.busy_since = None
            self.clock.add(time.perf_counter() - start)

    def install(self, update: WeightUpdate) -> None:
        """Load ``update`` into the engine; engines that can keep the buckets (mapped,
        read-only, or freshly received) skip the copy (docs/rollout.md)."""
        adopt = getattr(self.generator, "adopt_weights", None)
        (adopt or self.generator.load_weights)(update)
        self.awaiting_weights = False

    @contextlib.contextmanager
    def engine_lock(self):
        """``self.lock`` for a weight load. A dead vLLM engine leaves the generation that was
        running blocked forever, holding the lock: fail fast with the engine's verdict instead
        of waiting for the sync timeout."""
        while not self.lock.acquire(timeout=1.0):
            self._raise_if_unhealthy()
        try:
            self._raise_if_unhealthy()  # calls into a dead engine block: do not make one
            yield
        finally:
            self.lock.release()

    def policy_version(self) -> int:
        return self.generator.policy_version

    def _raise_if_restarted(self, weights: bool = True) -> None:
        missing = [what for what, flag in (("stream position", self.awaiting_stream),
                                           ("weights", weights and self.awaiting_weights)) if flag]
        if missing:
            raise RestartedWorker(f"rollout worker {self.worker_id} was restarted and its "
                                  f"{' and '.join(missing)} are not restored yet")

    def generate(self) -> list[Rollout]:
        """One batch of rollouts from the next prompts of this worker's stream."""
        self._raise_if_restarted()
        with self.lock, self.engine_call():
            prompts = self.stream.next_batch(self.cfg.rollout.batch_size)
            seed = (self.cfg.seed * 1_000_003 + self.worker_id * 7919 + self.calls) % 2**31
            rollouts = self.generator.generate(prompts, rollout_sampling(self.cfg, seed))
            self.calls += 1
            self.tokens += sum(len(r.response_ids) for r in rollouts)
            return rollouts

    def generate_round(self) -> tuple[list[Rollout], dict[str, Any]]:
        """Sync mode: one batch and the stream position after it, in one call. Asked for
        separately, a worker killed between the two calls would leave the driver without the
        position after a batch it already holds, and its restart would draw those prompts again."""
        rollouts = self.generate()
        return rollouts, self.state_dict()

    def produce(self, teachers: list, buffer, max_inflight: int, call_timeout_s: float) -> int:
        """Async mode: generate until stopped, round-robin batches to teachers.

        Back-pressure: before each batch the worker waits (in short slices, so ``stop`` is
        honoured) until the buffer has room for more unconsumed pairs, and it never has more than
        ``max_inflight`` batches waiting at the teachers. Before handing a batch to a teacher it
        reports its prompt-stream position after that batch to the buffer actor, so a restarted
        worker continues after the last batch it handed off (``BufferActor.stream_position``):
        the batch it was generating is redone, no prompt goes to the teacher twice.
        """
        self.stop_event.clear()  # a worker may produce again after an earlier stop (new driver)
        inflight: list = []
        batches = 0
        while not self.stop_event.is_set():
            if not ray.get(buffer.wait_for_room.remote(0.5), timeout=call_timeout_s):
                continue
            rollouts = self.generate()
            # position and prompts first (acknowledged), then the hand-off: a worker killed in
            # between skips this batch's prompts on restart instead of paying the teacher twice
            # for them; a checkpoint meanwhile has them in flight (a resume draws them again)
            key = ray.get(buffer.note_handoff.remote(self.worker_id, self.state_dict(),
                                                     [r.prompt.prompt_id for r in rollouts]), timeout=call_timeout_s)
            teacher = teachers[batches % len(teachers)]
            inflight.append(teacher.correct_and_store.remote(rollouts, buffer, key))
            batches += 1
            while len(inflight) >= max_inflight and not self.stop_event.is_set():
                done, inflight = ray.wait(inflight, num_returns=1, timeout=0.5)
                ray.get(done, timeout=call_timeout_s)  # surface teacher errors here
        ray.get(inflight, timeout=call_timeout_s)
        return batches

    def stop(self) -> None:
        self.stop_event.set()

    def load_weights(self, update: WeightUpdate) -> int:
        from correction_rl.distributed.weights import from_transport

        with self.engine_lock(), self.engine_call():
            if self.cfg.sync.inject_load_delay_s > 0:  # fault drill: a stalled engine
                time.sleep(self.cfg.sync.inject_load_delay_s)
            self.install(from_transport(update))
            return self.generator.policy_version

    def state_dict(self) -> dict[str, Any]:
        """Prompt-stream position and sampling-call count (checkpoint). Lock-free on purpose:
        a checkpoint after a stalled sync must not wait for the stalled ``load_weights``. A
        restarted worker has no position of its own until the driver restores it."""
        self._raise_if_restarted(weights=False)
        return self._state()

    def _state(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict(), "calls": self.calls, "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, Any] | None, logged_after: Sequence[str] = ()) -> dict[str, Any]:
        """Stream position and counters (a checkpoint's, or a restarted worker's predecessor's;
        None: keep the fresh stream — the predecessor had drawn nothing known). A resumed run
        also passes the prompt ids whose pairs were logged after its checkpoint: they are not
        drawn again (``PromptStream.account_for_logged``). Returns the state now held."""
        with self.lock:
            if state is not None:
                self.stream.load_state_dict(state["stream"])
                self.calls = int(state["calls"])
                self.tokens = int(state.get("tokens", 0))
            self.stream.account_for_logged(logged_after)
            self.awaiting_stream = False
            return self._state()

    def greedy(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[str]:
        from correction_rl.types import Sampling

        with self.lock:
            out = self.generator.generate(prompts, Sampling(max_new_tokens=max_new_tokens, temperature=0.0))
        return [r.response_text for r in out]

    def evaluate(self, prompts: Sequence[Prompt]):
        """Held-out evaluation with this worker's engine (production pauses meanwhile).

        The KL(pi || pi_init) estimate needs the policy as a torch model: the HF engine has one;
        with vLLM the KL column stays empty.
        """
        from correction_rl.run.components import eval_modes
        from correction_rl.run.evaluation import evaluate
        from correction_rl.models import load_model, load_tokenizer

        self._raise_if_restarted()
        policy_model = getattr(self.generator, "model", None)
        if self.init_model is None and policy_model is not None:
            self.init_model = load_model(self.cfg.model.path).eval()
        if self.eval_teacher is None:  # built once: a model teacher is an engine of its own
            self.eval_teacher = build_eval_teacher(self.cfg)
        with self.lock:
            return evaluate(
                self.generator,
                prompts,
                self.eval_teacher,
                rollout_sampling(self.cfg, seed=self.cfg.seed),
                policy_model=policy_model,
                init_model=self.init_model,
                tokenizer=load_tokenizer(self.cfg.model.path),
                modes=eval_modes(self.cfg),
            )

    def metrics(self) -> dict[str, float]:
        return {
            f"rollout/worker{self.worker_id}/idle_fraction": self.clock.idle_fraction(),
            f"rollout/worker{self.worker_id}/tokens": float(self.tokens),
            f"rollout/worker{self.worker_id}/version": float(self.generator.policy_version),
        }

    def close(self) -> None:
        for part in (self.generator, self.eval_teacher):
            close = getattr(part, "close", None)
            if close:
                close()

    # === collective weight transport (sync.transport: collective; distributed/collective.py) ===
    # This worker (HF engine: the actor process itself) or its vLLM engine's workers (GPU:
    # ``crl_nccl_init`` in rollout/vllm_worker.py) are members of a weight group whose rank 0 is
    # learner rank 0. The state lives in attributes created on first join, so a worker restarted
    # by Ray reports "not joined" (``collective_generation`` is None) and the driver rebuilds.

    def _collective_vllm(self) -> bool:
        return callable(getattr(self.generator, "receive_nccl", None))

    def collective_num_ranks(self) -> int:
        """Members this worker adds to the group: its vLLM engine's workers, or itself (HF)."""
        return int(getattr(self.generator, "num_workers", 1)) if self._collective_vllm() else 1

    def collective_generation(self) -> int | None:
        """The group generation this worker joined (None: none). Lock-free: it must answer while
        a generation runs."""
        return getattr(self, "_wg_generation", None)

    def collective_join(self, address, rank_offset: int, layout, timeout_s: float) -> int:
        """Leave any previous group, then join ``address`` as rank ``rank_offset`` (vLLM: its
        workers from that rank on). Holds the lock: vLLM's ``LLM`` must not serve an RPC while it
        generates. Blocks until every member joined (bounded: ``SyncTimeout``)."""
        from correction_rl.weights.sync import run_with_timeout
        from correction_rl.weights.group import WeightGroup

        with self.engine_lock():
            self._collective_close()
            if self._collective_vllm():
                if address.backend != "nccl":
                    raise ValueError(
                        "a vLLM engine joins NCCL weight groups only (its worker extension has no "
                        "gloo receiver); use sync.transport=object_store on CPU"
                    )
                llm = self.generator.llm
                stage = f"vLLM workers joining the NCCL weight group from rank {rank_offset}"
                run_with_timeout(
                    lambda: llm.collective_rpc("crl_nccl_init", timeout=timeout_s, args=(
                        address.host, address.port, rank_offset, address.world_size)),
                    timeout_s, -1, stage,
                )
                self._wg = "vllm"
            else:
                device = getattr(self.generator, "device", None) if address.backend == "nccl" else "cpu"
                self._wg = WeightGroup.join(address, rank_offset, timeout_s, device=device)
            self._wg_layout = layout
            self._wg_generation = address.generation
            return address.generation

    def collective_receive(self, version: int, timeout_s: float):
        """Receive version ``version`` from learner rank 0 and load it, under the lock like
        ``load_weights`` (and with its fault drill ``sync.inject_load_delay_s``). The received
        buckets are fresh, so the HF engine adopts them without a copy. Returns a
        ``TransferReport``."""
        from correction_rl.weights.sync import run_with_timeout
        from correction_rl.weights.group import TransferReport

        group = getattr(self, "_wg", None)
        if group is None:
            raise RuntimeError(f"rollout worker {self.worker_id} is in no weight group (restarted?)")
        layout = self._wg_layout
        with self.engine_lock(), self.engine_call():  # the stall check sees a stuck receive
            start = time.perf_counter()
            deadline = time.monotonic() + timeout_s
            if self.cfg.sync.inject_load_delay_s > 0:  # fault drill: a stalled engine
                time.sleep(self.cfg.sync.inject_load_delay_s)
            remaining = max(1e-3, deadline - time.monotonic())
            t0 = time.perf_counter()
            if group == "vllm":
                run_with_timeout(lambda: self.generator.receive_nccl(layout.describe(version)),
                                 remaining, version, "vLLM workers receive + reload")
                transfer = time.perf_counter() - t0
                self.awaiting_weights = False
            else:
                update = group.receive(layout, version, remaining)
                transfer = time.perf_counter() - t0
                self.install(update)
            seconds = time.perf_counter() - start
        return TransferReport(version=self.generator.policy_version, seconds=seconds,
                              transfer_seconds=transfer, num_bytes=layout.num_bytes)

    def collective_leave(self) -> None:
        with self.lock:
            self._collective_close()

    def _collective_close(self) -> None:
        group = getattr(self, "_wg", None)
        self._wg, self._wg_layout, self._wg_generation = None, None, None
        if group == "vllm":
            llm = getattr(self.generator, "llm", None)
            if llm is not None:
                llm.collective_rpc("crl_nccl_close", timeout=30)
        elif group is not None:
            group.close()

    # === end of the collective weight transport block ======================================


class TeacherWorker:
    """Holds one teacher; turns rollouts into pairs (with reference log-probs when needed)."""

    def __init__(self, cfg: RunConfig, worker_id: int):
        from correction_rl.models import load_model, load_tokenizer
        from correction_rl.learner.objectives import needs_reference

        self.cfg = cfg
        self.worker_id = worker_id
        self.teacher = build_teacher(cfg)
        self.tokenizer = load_tokenizer(cfg.model.path)
        self.reference = None
        if needs_reference(cfg.objective):
            from correction_rl.pairs.reference import ReferenceScorer

            self.reference = ReferenceScorer(
                load_model(cfg.model.path), self.tokenizer.pad_token_id, cfg.objective, cfg.model
            )
        self.clock = BusyClock()
        self.skipped: dict[str, int] = {}
        self.pairs = 0

    def pid(self) -> int:
        return os.getpid()

    def correct(self, rollouts: Sequence[Rollout]) -> list[CorrectionPair]:
        from correction_rl.pairs.make import make_pairs

        start = time.perf_counter()
        corrections = self.teacher.correct(rollouts)
        pairs, skipped = make_pairs(corrections, self.tokenizer, self.tokenizer.eos_token_id)
        if self.reference is not None:
            pairs = self.reference.attach(pairs)
        for reason, n in skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        self.pairs += len(pairs)
        self.clock.add(time.perf_counter() - start)
        return pairs

    def correct_and_store(self, rollouts: Sequence[Rollout], buffer, batch_key=None) -> int:
        """Async mode: correct, then push straight into the buffer actor (no driver hop); the
        buffer marks the hand-off ``batch_key`` done in the same call (``HandoffLedger``)."""
        pairs = self.correct(rollouts)
        ray.get(buffer.add.remote(pairs, batch_key), timeout=self.cfg.resources.call_timeout_s)
        return len(pairs)

    def metrics(self) -> dict[str, float]:
        out = {
            f"teacher/worker{self.worker_id}/idle_fraction": self.clock.idle_fraction(),
            f"teacher/worker{self.worker_id}/pairs": float(self.pairs),
        }
        out.update({f"teacher/skipped/{k}": float(v) for k, v in self.skipped.items()})
        teacher_metrics = getattr(self.teacher, "metrics", None)
        if callable(teacher_metrics):  # LLM teachers: latency, tokens, rejections by reason
            out.update(teacher_metrics())
        return out

    def close(self) -> None:
        close = getattr(self.teacher, "close", None)
        if close:
            close()


class BufferActor:
    """The replay buffer and its durable correction log, in one actor (threaded: producers may
    block in ``wait_for_room`` while the learner samples)."""

    def __init__(self, cfg: RunConfig, log_path: str):
        self.buffer = ReplayBuffer(buffer_config(cfg), CorrectionLog(log_path, meta={"run": cfg.name}))
        self.handoffs = HandoffLedger()
        """Async mode: where each producer's stream stood after its last hand-off, and which
        prompts are with a teacher. Kept here because the buffer actor lives as long as the run
        and Ray never restarts it, so a restarted rollout worker can continue where its
        predecessor stopped, and because pairs and hand-offs must be snapshotted together."""
        self.lock = threading.Lock()
        """Orders ``add`` against ``checkpoint_state`` (this actor is threaded)."""

    def add(self, pairs: list[CorrectionPair], batch_key=None) -> int:
        with self.lock:
            admitted = self.buffer.add(pairs).admitted
            self.handoffs.resolve(batch_key)
        return admitted

    def wait_for_room(self, timeout: float) -> bool:
        return self.buffer.wait_for_room(timeout)

    def note_handoff(self, worker_id: int, state: dict[str, Any], prompt_ids: list[str]):
        """A producer's state after drawing a batch it is about to hand to a teacher, and that
        batch's prompts; returns the batch key the teacher passes back to ``add``."""
        with self.lock:
            return self.handoffs.note(worker_id, state, prompt_ids)

    def stream_position(self, worker_id: int) -> dict[str, Any] | None:
        with self.lock:
            return self.handoffs.position(worker_id)

    def seed_stream_positions(self, states: list[dict[str, Any] | None]) -> None:
        """A resumed run's restored worker states: positions until each worker hands off."""
        with self.lock:
            for worker_id, state in enumerate(states):
                self.handoffs.seed(worker_id, state)

    def checkpoint_state(self, num_workers: int) -> dict[str, Any]:
        """Async mode: the buffer and the workers' states in one snapshot — every prompt drawn
        before a worker's position is either in the buffer's log up to ``log_records`` or drawn
        again first on resume (``HandoffLedger.checkpoint_states``)."""
        with self.lock:
            return {"buffer": self.buffer.state_dict(),
                    "rollout_workers": self.handoffs.checkpoint_states(num_workers)}

    def sample(self, n: int, learner_version: int, timeout: float) -> list[CorrectionPair] | None:
        """Wait up to ``timeout`` for ``n`` admissible pairs, then sample them (None if not)."""
        if not self.buffer.wait_until_ready(n, learner_version, timeout):
            return None
        return self.buffer.sample(n, learner_version)

    def set_learner_version(self, version: int) -> int:
        return self.buffer.set_learner_version(version)

    def metrics(self) -> dict[str, float]:
        return self.buffer.stats().as_metrics()

    def state_dict(self) -> dict[str, Any]:
        return self.buffer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> dict[str, Any]:
        """Restore a checkpointed buffer; pairs logged after the checkpoint are admitted too,
        and their prompt ids are returned (the rollout workers do not draw those again)."""
        result = self.buffer.load_state_dict(state)
        return {"logged": result.logged, "admitted": result.admitted, "size": len(self.buffer),
                "prompts_logged_after": list(result.prompts_logged_after)}

    def close(self) -> None:
        self.buffer.close()


class LearnerRank:
    """One data-parallel learner rank: a DeepSpeed engine in its own process.

    The driver picks the rendezvous (rank 0's address and a free port) and passes it to every
    rank, so torch.distributed (gloo on CPU, NCCL on GPU) connects the ranks directly.
    """

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, master_addr: str, master_port: int):
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK="0",  # Ray gives each rank its own device set, seen as device 0
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )
        from correction_rl.learner.learner import Learner
        from correction_rl.models import load_model, load_tokenizer

        self.cfg = cfg
        self.rank = rank
        tokenizer = load_tokenizer(cfg.model.path)
        self.learner = Learner(
            load_model(cfg.model.path),
            pad_id=tokenizer.pad_token_id,
            learner_cfg=cfg.learner,
            objective_cfg=cfg.objective,
            model_cfg=cfg.model,
            total_steps=cfg.total_steps,
        )
        self.clock = BusyClock()

    def pid(self) -> int:
        return os.getpid()

    def train_step(self, pairs: list[CorrectionPair]) -> StepStats:
        start = time.perf_counter()
        stats = self.learner.train_step(pairs)
        self.clock.add(time.perf_counter() - start)
        return stats

    def export(self) -> dict[str, Any] | None:
        """Gather the full weights (a collective under ZeRO-3: every rank calls it); rank 0 puts
        them into the object store once and returns the reference with the update's size."""
        from correction_rl.distributed.weights import to_transport

        update = self.gathered_update()
        if update is None:
            return None
        return {
            "ref": [ray.put(to_transport(update))],  # nested, so Ray passes the reference along
            "version": update.version,
            "num_bytes": update.num_bytes,
            "num_buckets": len(update.buckets),
        }

    def gathered_update(self) -> WeightUpdate | None:
        """The full weights as buckets on rank 0 (None on the others). Every rank must call it:
        under ZeRO-3 each parameter is gathered collectively."""
        from correction_rl.weights.sync import flatten_to_buckets

        named = self.rank0_weights()
        return None if named is None else flatten_to_buckets(named, self.learner.version, self.cfg.sync.bucket_mb * 2**20)

    def rank0_weights(self):
        """``named_weights()`` on rank 0, None elsewhere. Every rank must call it: under ZeRO-3
        each parameter is gathered collectively, so the other ranks walk the iterator too."""
        named = self.learner.named_weights()
        if self.rank == 0:
            return named
        for _ in named:  # take part in the gathers
            pass
        return None

    def version(self) -> int:
        return self.learner.version

    def save_state(self, path: str) -> None:
        """Checkpoint (every rank: DeepSpeed writes each rank's ZeRO shard)."""
        self.learner.save_state(path, rank=self.rank)

    def load_state(self, path: str) -> int:
        self.learner.load_state(path, rank=self.rank)
        return self.learner.version

    def save_pretrained(self, path: str) -> None:
        """Every rank must call it: under ZeRO-3 the weights are gathered collectively; rank 0
        writes."""
        if self.rank == 0:
            self.learner.save_pretrained(path)
        else:
            self.rank0_weights()

    def metrics(self) -> dict[str, Any]:
        return {f"train/rank{self.rank}/idle_fraction": self.clock.idle_fraction()}

    # === collective weight transport (sync.transport: collective; distributed/collective.py) ===
    # Rank 0 is rank 0 of the weight group and broadcasts; every learner rank still calls
    # ``collective_layout`` / ``collective_send`` because under ZeRO-3 gathering the weights is
    # a collective of the learner's own world.

    def collective_layout(self):
        """The static ``WeightLayout`` of this model's updates (rank 0; other ranks take part in
        the gathers and return None). Planned on meta tensors: no second copy of the weights."""
        from correction_rl.weights.group import WeightLayout

        named = self.rank0_weights()
        return None if named is None else WeightLayout.plan(named, self.cfg.sync.bucket_mb * 2**20)

    def collective_join(self, address, layout, timeout_s: float) -> int:
        """Rank 0 only: leave any previous group, then host and join ``address`` as its rank 0
        (blocks until every member joined; bounded: ``SyncTimeout``)."""
        import torch

        from correction_rl.weights.group import WeightGroup

        if self.rank != 0:
            raise RuntimeError(f"learner rank {self.rank} is not a weight group member; rank 0 is")
        self.collective_leave()
        device = torch.device("cuda", torch.cuda.current_device()) if address.backend == "nccl" else None
        self._wg = WeightGroup.join(address, 0, timeout_s, device=device)
        self._wg_layout = layout
        return address.generation

    def collective_send(self, version: int, timeout_s: float):
        """Gather (every rank), bucket and broadcast (rank 0) the current weights as ``version``.
        Rank 0 gathers before any check can fail, so the other ranks never wait in a gather
        rank 0 skipped. Returns rank 0's ``TransferReport`` (None on other ranks)."""
        from correction_rl.weights.group import TransferReport

        start = time.perf_counter()
        update = self.gathered_update()
        if update is None:
            return None
        group = getattr(self, "_wg", None)
        if group is None:
            raise RuntimeError("learner rank 0 is in no weight group; the driver must set it up first")
        if update.version != version:
            raise ValueError(f"the driver syncs version {version}, learner rank 0 holds {update.version}")
        self._wg_layout.check(update)
        transfer = group.send(update, max(1e-3, timeout_s - (time.perf_counter() - start)))
        return TransferReport(version=version, seconds=time.perf_counter() - start,
                              transfer_seconds=transfer, num_bytes=update.num_bytes)

    def collective_leave(self) -> None:
        group = getattr(self, "_wg", None)
        self._wg, self._wg_layout = None, None
        if group is not None:
            group.close()

    # === end of the collective weight transport block ======================================
