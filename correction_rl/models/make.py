"""``make_model`` and the ``correction-rl make-model`` command: build, save, report.

One function writes every member of the offline family (any size, either architecture, the
character or the BPE tokenizer, with or without a chat template) as a standard HF directory,
plus ``correction_rl.json`` recording how it was made, so a directory can be rebuilt exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from correction_rl.models.family import ARCHS, SHAPES, Arch, ModelSize, build_model

TokenizerKind = Literal["char", "bpe"]
TOKENIZERS: tuple[str, ...] = ("char", "bpe")


def build_family_tokenizer(kind: TokenizerKind = "char", chat: bool = False, vocab_size: int | None = None):
    """The character tokenizer (``chat`` refused: it has no turn tokens) or the BPE one."""
    if kind == "char":
        if chat or vocab_size is not None:
            raise ValueError("--chat and --vocab-size need --tokenizer bpe (the character tokenizer has no turn tokens)")
        from correction_rl.models.char import build_tokenizer

        return build_tokenizer()
    if kind == "bpe":
        from correction_rl.models.bpe import DEFAULT_VOCAB_SIZE, build_bpe_tokenizer

        return build_bpe_tokenizer(chat=chat, vocab_size=vocab_size or DEFAULT_VOCAB_SIZE)
    raise ValueError(f"unknown tokenizer {kind!r}; allowed: {list(TOKENIZERS)}")


def make_model(
    path: str | Path,
    size: ModelSize = "tiny",
    seed: int = 0,
    *,
    tokenizer: TokenizerKind = "char",
    chat: bool = False,
    arch: Arch = "llama",
    vocab_size: int | None = None,
) -> Path:
    """Build and save model + tokenizer to ``path`` (a standard HF directory). The defaults
    give the original tiny character-level Llama."""
    path = Path(path)
    tok = build_family_tokenizer(tokenizer, chat, vocab_size)
    model = build_model(size, seed, tokenizer=tok, arch=arch)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    record: dict = {"size": size, "seed": seed}
    if (tokenizer, chat, arch) != ("char", False, "llama"):
        record.update(tokenizer=tokenizer, chat=chat, arch=arch, vocab_size=len(tok))
    (path / "correction_rl.json").write_text(json.dumps(record) + "\n")
    return path


def cli(argv: list[str]) -> int:
    """``correction-rl make-model PATH [--size S] [--seed N] [--tokenizer char|bpe] [--chat]
    [--arch llama|qwen2] [--vocab-size N]``."""
    import argparse

    from correction_rl.models.family import count_parameters, load_model

    parser = argparse.ArgumentParser(prog="correction-rl make-model", description=make_model.__doc__)
    parser.add_argument("path")
    parser.add_argument("--size", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default="char", choices=TOKENIZERS,
                        help="char: one token per ASCII character (default); bpe: byte-level BPE")
    parser.add_argument("--chat", action="store_true",
                        help="ChatML chat template, eos <|im_end|> (needs --tokenizer bpe)")
    parser.add_argument("--arch", default="llama", choices=ARCHS)
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="BPE vocabulary to train (default 1024; the training text supports at most 1,681)")
    args = parser.parse_args(argv)
    if args.tokenizer == "char" and (args.chat or args.vocab_size is not None):
        parser.error("--chat and --vocab-size need --tokenizer bpe")
    if args.vocab_size is not None and args.vocab_size < 300:
        parser.error(f"--vocab-size: must be >= 300 (4 specials + 256 bytes + merges), got {args.vocab_size}")
    path = make_model(args.path, args.size, args.seed, tokenizer=args.tokenizer, chat=args.chat,
                      arch=args.arch, vocab_size=args.vocab_size)
    kind = f"{args.arch} {args.tokenizer}{' chat' if args.chat else ''}"
    print(f"wrote {args.size} {kind} model ({count_parameters(load_model(path)):,} parameters) to {path}")
    return 0
