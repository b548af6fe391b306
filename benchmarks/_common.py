"""What the benchmarks share for ``--device cuda``: synchronised timing, CUDA peak memory, the
device's description, and locally built Llama models of ~0.5B and ~1B parameters.

Why a helper: a CUDA kernel launch returns before the kernel has run, so a timing without
``torch.cuda.synchronize()`` on both sides measures the launch, not the work; and process memory
(what the CPU benchmarks read) says nothing about the GPU's. ``cuda_peak_bytes`` reports
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus what was allocated
before the measured call: the extra memory the call needed at its peak.
"""

from __future__ import annotations

import datetime
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Dense bf16 tensor-core peak used for MFU (H200 SXM / H100 SXM: 989 TFLOP/s without sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def add_device_argument(parser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where to run; cuda times with synchronisation and reads CUDA peak memory")


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    """Wall seconds of ``fn()``, synchronised on CUDA so the kernels' run time is counted."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


@dataclass
class Timing:
    median_s: float
    best_s: float
    samples: list[float]


def repeat_timed(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1,
                 before: Callable[[], object] | None = None) -> Timing:
    """Median and best of ``repeats`` synchronised runs after ``warmup`` untimed ones;
    ``before`` (untimed) restores inputs that a run consumes, e.g. logits overwritten in place."""
    samples = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        seconds = timed(fn, device)
        if i >= warmup:
            samples.append(seconds)
    return Timing(statistics.median(samples), min(samples), samples)


def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory ``fn()`` allocated beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


def device_info(device: str) -> dict:
    info = {"device": device, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def peak_flops(device: str) -> float | None:
    """The GPU's dense bf16 peak (for MFU), or None when it is not in the table."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# Llama shapes for the learner benchmarks on a GPU: built locally (random init), never downloaded.
# Vocabulary 32,000 keeps the LM head a realistic share; head dim 64 as elsewhere in the project.
LLAMA_SHAPES = {
    "0.5b": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, intermediate_size=5504),
}
LLAMA_VOCAB = 32_000


def build_llama(shape: str, device: str, seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` of one of ``LLAMA_SHAPES``, fp32, built on
    ``device`` directly (initialising 1B parameters on the CPU takes longer than the benchmark)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=LLAMA_VOCAB, max_position_embeddings=4096, tie_word_embeddings=False,
                      num_key_value_heads=LLAMA_SHAPES[shape]["num_attention_heads"], **LLAMA_SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model


def train_flops_per_token(model, seq_len: int) -> float:
    """6 N per token for the matmuls (forward 2N, backward 4N) plus attention's
    12 * layers * hidden * seq (scores and values, causal mask not discounted), the usual MFU
    convention (PaLM appendix B)."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters()) - cfg.vocab_size * cfg.hidden_size  # no embedding
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
