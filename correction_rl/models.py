"""Tiny offline models: a character tokenizer and a Llama-architecture causal LM.

Nothing can be downloaded from a model hub on the project's machines, so tests, benchmarks and
the demo build their own models here and save them as standard Hugging Face directories that
both ``transformers`` and vLLM load offline. The tokenizer is character-level over printable
ASCII plus newline: every task in ``correction_rl.tasks`` is written in that alphabet, and one
character per token makes token edit distance equal character edit distance, which keeps the
"amount of correction" easy to read.

Head dim is 64 in every size: vLLM's CPU attention backend refuses 16 (ENVIRONMENT.md).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ModelSize = Literal["tiny", "base", "small"]

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
ALPHABET = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # printable ASCII + "\n"


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
    # < 1M parameters: unit and integration tests, the demo policy.
    "tiny": ModelShape(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256),
    # ~3M parameters: a stronger teacher of the same family, quick to warm-start.
    "base": ModelShape(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688),
    # ~25M parameters: benchmarks (rollout throughput, shared prefix, weight sync).
    "small": ModelShape(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1408),
}


def vocab() -> dict[str, int]:
    """Token -> id. Specials first so that pad=0, bos=1, eos=2, unk=3 in every model."""
    tokens = SPECIAL_TOKENS + ALPHABET
    return {tok: i for i, tok in enumerate(tokens)}


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` that splits every character into its own token and adds
    ``<bos>`` in front of each encoded text (so HF and vLLM see identical prompt ids)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    table = vocab()
    core = Tokenizer(models.WordLevel(vocab=table, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, table[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",  # left padding for generation; the learner pads on its own
        clean_up_tokenization_spaces=False,
    )


def build_model(size: ModelSize = "tiny", seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` of the given size, deterministic for a seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in SHAPES:
        raise ValueError(f"unknown model size {size!r}; allowed: {sorted(SHAPES)}")
    shape = SHAPES[size]
    table = vocab()
    config = LlamaConfig(
        vocab_size=len(table),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=table[BOS],
        eos_token_id=table[EOS],
        pad_token_id=table[PAD],
        torch_dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = table[PAD]
    model.generation_config.eos_token_id = table[EOS]
    model.generation_config.bos_token_id = table[BOS]
    return model


def make_model(path: str | Path, size: ModelSize = "tiny", seed: int = 0) -> Path:
    """Build and save model + tokenizer to ``path`` (a standard HF directory)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = build_model(size, seed)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    (path / "correction_rl.json").write_text(json.dumps({"size": size, "seed": seed}) + "\n")
    return path


def load_model(path: str | Path, dtype: str = "float32"):
    """Load a saved causal LM (ours or any HF directory) for training or HF generation."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def cli(argv: list[str]) -> int:
    """``correction-rl make-model PATH [--size tiny|base|small] [--seed N]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="correction-rl make-model", description=make_model.__doc__)
    parser.add_argument("path")
    parser.add_argument("--size", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_model(args.path, args.size, args.seed)
    print(f"wrote {args.size} model ({count_parameters(load_model(path)):,} parameters) to {path}")
    return 0
