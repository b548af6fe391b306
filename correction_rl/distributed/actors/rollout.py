"""The rollout worker actor: one generation engine and its own shard of the prompt stream."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Sequence

import ray

from correction_rl.config import RunConfig
from correction_rl.distributed.actors.clock import BusyClock
from correction_rl.distributed.actors.drills import DRILL_LOAD_DELAY_ENV, drill_delay
from correction_rl.distributed.collective_member import ReceivingMember
from correction_rl.distributed.records import EngineHealth, WorkerState
from correction_rl.prompts.stream import PromptStream
from correction_rl.rollout.base import AdoptsWeights, ChecksHealth, Closeable, EngineUnhealthy, TorchPolicy
from correction_rl.run.components import build_eval_teacher, build_generator, rollout_sampling
from correction_rl.types import Prompt, Rollout, WeightUpdate

class RestartedWorker(RuntimeError):
    """A restarted rollout worker was asked for prompts or an evaluation before the driver gave
    it back its predecessor's stream position and the current weights, or for its stream
    position before that was restored."""


class RolloutWorker:
    """Holds one generation engine and its own shard of the prompt stream."""

    def __init__(self, cfg: RunConfig, worker_id: int, prompts: Sequence[Prompt]):
        self.cfg = cfg
        self.worker_id = worker_id
        self.generator = build_generator(cfg, seed_offset=worker_id)
        self.stream = PromptStream(prompts, seed=cfg.seed * 1000 + worker_id)
        self.lock = threading.Lock()  # generation and weight loading never overlap
        self.stop_event = threading.Event()
        self.version_loaded = threading.Condition()
        """Notified after every weight load (``wait_for_version``)."""
        self.version_wait_s = 0.0
        self.clock = BusyClock()
        self.calls = 0
        self.tokens = 0
        self.init_model = None  # loaded on first evaluation (KL reference)
        self.eval_teacher = None  # built on first evaluation (eval.teacher)
        self.member = ReceivingMember(self.generator, worker_id)
        """Membership of the collective weight group (``sync.transport: collective``)."""
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

    # -- health ---------------------------------------------------------------------------------
    def health(self) -> EngineHealth:
        """Lock-free (it must answer while a generation runs): the process id (a new one means
        Ray restarted this actor), the engine's own verdict, and how long the current engine
        call has been running."""
        busy = self.busy_since
        return EngineHealth(pid=os.getpid(), problem=self.engine_problem(),
                            busy_for_s=0.0 if busy is None else time.monotonic() - busy)

    def engine_problem(self) -> str | None:
        return self.generator.check_health() if isinstance(self.generator, ChecksHealth) else None

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

    def _raise_if_restarted(self, weights: bool = True) -> None:
        missing = [what for what, flag in (("stream position", self.awaiting_stream),
                                           ("weights", weights and self.awaiting_weights)) if flag]
        if missing:
            raise RestartedWorker(f"rollout worker {self.worker_id} was restarted and its "
                                  f"{' and '.join(missing)} are not restored yet")

    # -- generation -----------------------------------------------------------------------------
    def policy_version(self) -> int:
        return self.generator.policy_version

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

    def generate_round(self) -> tuple[list[Rollout], WorkerState]:
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
            useful = ray.get(buffer.room.remote(0.5), timeout=call_timeout_s)
            if useful is None:  # no room
                continue
            if self.generator.policy_version < useful:  # its pairs would only be evicted as stale:
                self.wait_for_version(useful, 0.5)  # the load is under way; then ask again
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

    def wait_for_version(self, version: int, timeout: float) -> bool:
        """Block until this worker serves ``version`` or newer (a weight load), at most
        ``timeout`` seconds; the time counts as ``rollout/worker<i>/version_wait_s``."""
        start = time.perf_counter()
        with self.version_loaded:
            ok = self.version_loaded.wait_for(
                lambda: self.generator.policy_version >= version or self.stop_event.is_set(), timeout)
        self.version_wait_s += time.perf_counter() - start
        return ok

    def stop(self) -> None:
        self.stop_event.set()
        with self.version_loaded:
            self.version_loaded.notify_all()

    # -- weights --------------------------------------------------------------------------------
    def install(self, update: WeightUpdate) -> None:
        """Load ``update`` into the engine; engines that can keep the buckets (mapped,
        read-only, or freshly received) skip the copy (docs/rollout.md)."""
        if isinstance(self.generator, AdoptsWeights):
            self.generator.adopt_weights(update)
        else:
            self.generator.load_weights(update)
        self.awaiting_weights = False
        with self.version_loaded:  # a producer waiting for this version goes on
            self.version_loaded.notify_all()

    def load_weights(self, update: WeightUpdate) -> int:
        """Object-store transport: load the published update (mapped from shared memory)."""
        from correction_rl.distributed.weights import from_transport

        with self.engine_lock(), self.engine_call():
            drill_delay(DRILL_LOAD_DELAY_ENV)
            self.install(from_transport(update))
            return self.generator.policy_version

    # -- stream position ------------------------------------------------------------------------
    def state_dict(self) -> WorkerState:
        """Prompt-stream position and sampling-call count (checkpoint). Lock-free on purpose:
        a checkpoint after a stalled sync must not wait for the stalled ``load_weights``. A
        restarted worker has no position of its own until the driver restores it."""
        self._raise_if_restarted(weights=False)
        return self._state()

    def _state(self) -> WorkerState:
        return WorkerState(stream=self.stream.state_dict(), calls=self.calls, tokens=self.tokens)

    def load_state_dict(self, state: WorkerState | None, logged_after: Sequence[str] = ()) -> WorkerState:
        """Stream position and counters (a checkpoint's, or a restarted worker's predecessor's;
        None: keep the fresh stream — the predecessor had drawn nothing known). A resumed run
        also passes the prompt ids whose pairs were logged after its checkpoint: they are not
        drawn again (``PromptStream.account_for_logged``). Returns the state now held."""
        with self.lock:
            if state is not None:
                self.stream.load_state_dict(state.stream)
                self.calls = state.calls
                self.tokens = state.tokens
            self.stream.account_for_logged(logged_after)
            self.awaiting_stream = False
            return self._state()

    # -- evaluation -----------------------------------------------------------------------------
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
        from correction_rl.models import load_model, load_tokenizer
        from correction_rl.run.components import eval_modes
        from correction_rl.run.evaluation import evaluate

        self._raise_if_restarted()
        policy_model = self.generator.model if isinstance(self.generator, TorchPolicy) else None
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
            f"rollout/worker{self.worker_id}/version_wait_s": self.version_wait_s,
        }

    def close(self) -> None:
        for part in (self.generator, self.eval_teacher):
            if isinstance(part, Closeable):
                part.close()

    # -- collective weight transport (distributed/collective.py; state in ``self.member``) ------
    def collective_num_ranks(self) -> int:
        return self.member.num_ranks()

    def collective_generation(self) -> int | None:
        """The group generation this worker joined (None: none). Lock-free: it must answer while
        a generation runs."""
        return self.member.generation

    def collective_join(self, address, rank_offset: int, layout, timeout_s: float) -> int:
        """Join the weight group (``ReceivingMember.join``) under the engine lock."""
        with self.engine_lock():
            return self.member.join(address, rank_offset, layout, timeout_s)

    def collective_receive(self, version: int, timeout_s: float):
        """Receive version ``version`` from learner rank 0 and load it, under the lock like
        ``load_weights`` (and with its fault drill). The received buckets are fresh, so the HF
        engine adopts them without a copy. Returns a ``TransferReport``."""
        from correction_rl.weights.group import TransferReport

        self.member.check_joined()
        with self.engine_lock(), self.engine_call():  # the stall check sees a stuck receive
            start = time.perf_counter()
            deadline = time.monotonic() + timeout_s
            drill_delay(DRILL_LOAD_DELAY_ENV)
            update, transfer = self.member.receive(version, max(1e-3, deadline - time.monotonic()))
            if update is None:  # the engine's workers loaded it
                self.awaiting_weights = False
            else:
                self.install(update)
            seconds = time.perf_counter() - start
        return TransferReport(version=self.generator.policy_version, seconds=seconds,
                              transfer_seconds=transfer, num_bytes=self.member.layout.num_bytes)

    def collective_leave(self) -> None:
        with self.lock:
            self.member.leave()
