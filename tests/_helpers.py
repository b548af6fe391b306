"""Plain helpers several test modules share (fixtures live in ``conftest.py``).

Imported as ``from _helpers import ...``: pytest puts this directory on ``sys.path`` for the
test modules here (no ``__init__.py``, the default ``prepend`` import mode), whether it runs as
``pytest`` or ``python -m pytest``; ``from tests.conftest import ...`` needs the repository root
on ``sys.path``, which only ``python -m pytest`` adds."""

from __future__ import annotations

import socket

import torch


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 free at the time of the call."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def addition_pairs(tok) -> list:
    """Eight correction pairs "i+i=" -> rejected 2i+1, chosen 2i (token ids of ``tok``, eos
    after each answer): a learner batch whose step moves the weights."""
    from correction_rl.types import CorrectionPair

    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # noqa: E731
    return [CorrectionPair(pair_id=f"p{i}", prompt_ids=tok(f"{i}+{i}=")["input_ids"], rejected_ids=enc(str(2 * i + 1)),
                           chosen_ids=enc(str(2 * i)), policy_version=0, teacher="test", edit_distance=1)
            for i in range(10, 18)]


def overfit(model, tok, seqs: list[list[int]], steps: int, lr: float = 3e-3) -> None:
    """Train ``model`` on the token sequences ``seqs`` (left-padded into one batch, loss on every
    real token) for ``steps`` AdamW steps, seeded: the tiny chat models' answers then sit far
    from greedy ties, so HF and vLLM must agree on them. One torch thread: 10-30x faster than
    2 on a shared, oversubscribed 2-core machine."""
    width = max(map(len, seqs))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    labels = ids.masked_fill(mask == 0, -100)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for _ in range(steps):
                loss = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, labels=labels).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
