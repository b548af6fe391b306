"""A byte-level BPE tokenizer with a ChatML chat template, trained offline.

Real instruct models (Qwen2, Llama 3, Mistral) use byte-level BPE and a chat template, and stop
on an end-of-turn token as well as on end-of-text. The character tokenizer has none of that, so
code paths that depend on it (chat rendering, several stop ids, BPE boundaries moving when a
corrected text is re-encoded, non-canonical token sequences) could not be tested offline. This
tokenizer is trained in about a second with ``tokenizers`` on the tasks' own text plus a small
English sample (``corpus.py``), so it needs no download and gives the same ids on every machine.

Layout, modelled on Qwen2:

* special tokens first: ``<|endoftext|>`` = 0, ``<|im_start|>`` = 1, ``<|im_end|>`` = 2,
  ``<|pad|>`` = 3; then the 256 byte symbols, then the learned merges;
* pre-tokenization by Qwen2's regex (digits one by one, so numbers never merge and the
  arithmetic tasks keep one token per digit), then byte-level mapping: every string encodes
  without an unknown token and ``decode(encode(text)) == text`` exactly (no normalizer);
* no BOS token: a prompt's ids are exactly its text's ids, as with Qwen2;
* with ``chat=True``: the ChatML template (``CHATML_TEMPLATE``) and ``eos_token`` =
  ``<|im_end|>`` (the end of an assistant turn, as Qwen2-Instruct), so code that knows one eos id
  stops at the end of the turn; ``<|endoftext|>`` stays a stop id through the generation config
  (``stop_token_ids``). Without ``chat``, eos is ``<|endoftext|>`` and there is no template.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterator

ENDOFTEXT, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, PAD]
TRAINING_TASKS: tuple[str, ...] = ("addition", "reverse", "sorting")
"""The tasks whose text trains the tokenizer. Fixed, not ``task_names()``: registering a new task
must not change the ids of tokenizers built before it."""
DEFAULT_VOCAB_SIZE = 1024
"""Target vocabulary (specials + 256 bytes + merges). Small because the training text is small:
a few thousand task lines and ~5 KB of English support about this many useful merges."""

PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Qwen2's split pattern (GPT-4 style, but one digit per piece)."""

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then
``<|im_start|>assistant\\n`` when a generation prompt is asked for. No default system prompt."""


def chatml(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The ChatML string ``CHATML_TEMPLATE`` renders, written out by hand (tests compare the two;
    callers that hold no tokenizer can use it)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def training_texts(per_task: int = 500, seed: int = 0, english_repeats: int = 20) -> Iterator[str]:
    """What the tokenizer learns from: each task's training prompts and answers (default
    difficulty, ``train`` split only, so held-out prompts do not shape the vocabulary), the
    English sample repeated ``english_repeats`` times, and a few ChatML role lines.

    The repeats weigh English against the tasks: ``reverse`` prompts are random letters, and
    without them most merges went to random letter pairs instead of English words."""
    from correction_rl.models.corpus import GENERAL_TEXT
    from correction_rl.tasks.registry import make_prompts

    for name in TRAINING_TASKS:
        for prompt in make_prompts([name], {}, per_task, "train", seed):
            yield prompt.text + (prompt.answer or "")
    for _ in range(english_repeats):
        yield from GENERAL_TEXT.splitlines()
    for role in ("system", "user", "assistant"):
        yield f"{role}\n"


def train_core(vocab_size: int = DEFAULT_VOCAB_SIZE, per_task: int = 500, seed: int = 0):
    """A ``tokenizers.Tokenizer`` trained on ``training_texts`` (deterministic for its arguments)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    core = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(training_texts(per_task, seed), trainer=trainer)
    return core


@lru_cache(maxsize=4)
def _trained_json(vocab_size: int) -> str:
    """Training takes ~1 s; a process that builds several models trains once per size."""
    return train_core(vocab_size).to_str()


def build_bpe_tokenizer(chat: bool = True, vocab_size: int = DEFAULT_VOCAB_SIZE):
    """A ``PreTrainedTokenizerFast`` over the trained byte-level BPE (see the module docstring
    for ids, eos and the template)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer.from_str(_trained_json(vocab_size))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=IM_END if chat else ENDOFTEXT,
        pad_token=PAD,
        padding_side="left",  # left padding for generation, as the character tokenizer
        clean_up_tokenization_spaces=False,
        chat_template=CHATML_TEMPLATE if chat else None,
    )


def stop_token_ids(tokenizer) -> list[int]:
    """Every id generation must stop on: the tokenizer's eos first, then ``<|endoftext|>`` and
    ``<|im_end|>`` when the vocabulary has them (what the generation config records)."""
    ids = [tokenizer.eos_token_id]
    for token in (ENDOFTEXT, IM_END) if tokenizer.chat_template else (ENDOFTEXT,):
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is not None and tid not in ids:
            ids.append(tid)
    return ids
