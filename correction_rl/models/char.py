"""The character tokenizer of the original tiny models.

Character-level over printable ASCII plus newline: every task in ``correction_rl.tasks`` is
written in that alphabet, and one character per token makes token edit distance equal character
edit distance, which keeps the "amount of correction" easy to read. It stays the default of
``make-model``; the BPE tokenizer (``bpe.py``) is the realistic alternative.
"""

from __future__ import annotations

import string

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
ALPHABET = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # printable ASCII + "\n"


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
