"""Model shapes and architectures of the offline family, and loading any HF causal LM.

Nothing can be downloaded from a model hub on the project's machines, so tests, benchmarks and
the demo build their own randomly initialised models and save them as standard Hugging Face
directories that both ``transformers`` and vLLM load offline. Two architectures are offered
because the models people align are one or the other: Llama (no attention biases; the
project's default since the start) and Qwen2 (q/k/v biases, the ChatML family).

Head dim is 64 in every size: vLLM's CPU attention backend refuses 16 (ENVIRONMENT.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ModelSize = Literal["tiny", "base", "small", "medium"]
Arch = Literal["llama", "qwen2"]
ARCHS: tuple[str, ...] = ("llama", "qwen2")


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


SHAPES: dict[str, ModelShape] = {
    # < 1M parameters (char vocab; ~0.6M with the 1k BPE vocab): unit and integration tests.
    "tiny": ModelShape(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256),
    # ~3M parameters: a stronger teacher of the same family, quick to warm-start.
    "base": ModelShape(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688),
    # ~25M parameters: benchmarks (rollout throughput, shared prefix, weight sync).
    "small": ModelShape(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1408),
    # ~93M parameters: the largest offline model, GPT-2-small scale (a realistic learner step).
    "medium": ModelShape(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2304,
                         max_position_embeddings=2048),
}


def build_model(size: ModelSize = "tiny", seed: int = 0, *, tokenizer=None, arch: Arch = "llama"):
    """A randomly initialised causal LM of the given size and architecture, deterministic for a
    seed. ``tokenizer`` sets the vocabulary size and the special ids (default: the character
    tokenizer); its generation config stops on every id of ``stop_ids(tokenizer)``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if size not in SHAPES:
        raise ValueError(f"unknown model size {size!r}; allowed: {sorted(SHAPES)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; allowed: {list(ARCHS)}")
    if tokenizer is None:
        from correction_rl.models.char import build_tokenizer

        tokenizer = build_tokenizer()
    shape = SHAPES[size]
    stops = stop_ids(tokenizer)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    if arch == "llama":
        config, cls = LlamaConfig(head_dim=shape.head_dim, **common), LlamaForCausalLM
    else:
        config, cls = Qwen2Config(use_sliding_window=False, **common), Qwen2ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def stop_ids(tokenizer) -> list[int]:
    """The ids a model built for ``tokenizer`` stops on (eos first); one id for the character
    tokenizer, eos plus ``<|endoftext|>`` / ``<|im_end|>`` for the BPE one."""
    from correction_rl.models.bpe import ENDOFTEXT, stop_token_ids

    if ENDOFTEXT in tokenizer.get_vocab():
        return stop_token_ids(tokenizer)
    return [tokenizer.eos_token_id]


def load_model(path: str | Path, dtype: str = "float32"):
    """Load a saved causal LM (ours or any HF directory) for training or HF generation."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def copy_tokenizer(source: str | Path, model_dir: str | Path) -> None:
    """Write the tokenizer of ``source`` (its chat template included) into ``model_dir``: the
    learner saves weights only, and a run's ``policy/`` must load on its own
    (``correction-rl eval --model RUN/policy``, vLLM, ``models.load_tokenizer``)."""
    load_tokenizer(source).save_pretrained(str(model_dir))


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
