"""The offline model family: tokenizers, model shapes and architectures, building and loading.

Nothing can be downloaded from a model hub on the project's machines, so tests, benchmarks and
the demo build their own models here and save them as standard Hugging Face directories that
both ``transformers`` and vLLM load offline (docs/models.md).

* ``char.py``: the character tokenizer of the original tiny models (the default);
* ``bpe.py`` + ``corpus.py``: a byte-level BPE tokenizer with a ChatML template, trained offline;
* ``family.py``: sizes (tiny .. medium, ~0.4M to ~93M parameters), Llama or Qwen2, loading;
* ``make.py``: ``make_model`` and the ``correction-rl make-model`` command.
"""

from correction_rl.models.char import ALPHABET, BOS, EOS, PAD, SPECIAL_TOKENS, UNK, build_tokenizer, vocab
from correction_rl.models.family import (
    ARCHS,
    SHAPES,
    Arch,
    ModelShape,
    ModelSize,
    build_model,
    copy_tokenizer,
    count_parameters,
    load_model,
    load_tokenizer,
    stop_ids,
)
from correction_rl.models.make import TOKENIZERS, build_family_tokenizer, cli, make_model

__all__ = [
    "ALPHABET", "ARCHS", "Arch", "BOS", "EOS", "ModelShape", "ModelSize", "PAD", "SHAPES",
    "SPECIAL_TOKENS", "TOKENIZERS", "UNK", "build_family_tokenizer", "build_model",
    "build_tokenizer", "cli", "copy_tokenizer", "count_parameters", "load_model", "load_tokenizer", "make_model",
    "stop_ids", "vocab",
]
