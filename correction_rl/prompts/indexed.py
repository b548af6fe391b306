"""A run's training prompts from a dataset, held as row numbers: the prompt stream reads a prompt
from the memory-mapped dataset when it draws it, instead of holding every ``Prompt``.

Why: the stream (``prompts/stream.py``) only ever needs *one* prompt at a time, plus a way to
look a prompt up by id (``replay``/``skip`` after a resume). A million ``Prompt`` records with
their conversations cost gigabytes; what the stream must keep is, per training prompt, its row
in the dataset and a 64-bit hash of its id: 16 bytes a prompt (numpy arrays, which also travel
to the Ray rollout workers without pickling a million objects). Measured in docs/models.md
("Prompt datasets", memory).

How rows are read back: through the ``datasets`` library's random-access ``Dataset``, an Arrow
table memory-mapped from disk, so reading row ``i`` pages in that row only. A ``save_to_disk``
directory already is one; JSONL/parquet files (and hub sets) are converted once into the
library's Arrow cache (``HF_DATASETS_CACHE``, reused while the files are unchanged). The
validation pass before that stays the streamed one of ``prompts/datasets.py``: every row goes
through ``row_to_prompt`` (the same function that builds a drawn prompt later), a bad row stops
the run before it starts with the file and the row, and a bad file is never converted.

What stays exactly as it was: the prompts, their order (training rows in dataset order, so the
stream's seeded permutation picks the same prompt at every position), their ids, and the
stream's state. A run over a dataset draws the prompts the list-based stream drew, and its
checkpoints resume either way (``tests/test_dataset_stream.py`` checks both).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from typing import Any, Iterator

import numpy as np

from correction_rl.prompts.datasets import (
    DatasetError,
    DatasetSource,
    FieldMap,
    _check_split_args,
    _rows,
    _stem,
    is_held_out,
    iter_prompts,
    open_by_row,
    row_to_prompt,
)
from correction_rl.types import Prompt


def id_hash(prompt_id: str) -> int:
    """64 bits of a prompt id: the key of ``DatasetPrompts.find`` (a match is confirmed on the
    row itself, so a collision costs a row read, never a wrong prompt)."""
    return int.from_bytes(hashlib.blake2b(prompt_id.encode(), digest_size=8).digest(), "little")


class DatasetPrompts(Sequence):
    """The training prompts of a dataset, read by row when asked for.

    ``self[k]`` is the ``k``-th training prompt in dataset order (what ``load_prompts(source,
    "train", ...)[k]`` returns, the same record); ``self[i::n]`` is a shard (a Ray rollout
    worker's), still rows only; ``find(prompt_id)`` looks a prompt up by id. Pickles without its
    open dataset (a worker reopens it: the path must be readable there, as ``model.path`` is)."""

    def __init__(self, source: DatasetSource, rows: np.ndarray, hashes: np.ndarray, num_rows: int):
        self.source = source
        self.rows = rows
        """Dataset row of each prompt (int64, ascending)."""
        self.hashes = hashes
        """``id_hash`` of each prompt's id (uint64), parallel to ``rows``."""
        self.num_rows = num_rows
        """Rows the validation pass saw: the opened dataset must have as many (same data)."""
        self._stem = _stem(source)
        self._dataset = None
        self._index: tuple[np.ndarray, np.ndarray] | None = None  # (sorted hashes, positions)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return DatasetPrompts(self.source, self.rows[k], self.hashes[k], self.num_rows)
        row = int(self.rows[k])
        prompt = row_to_prompt(self.dataset()[row], row, self.source, self._stem)
        if id_hash(prompt.prompt_id) != int(self.hashes[k]):  # one hash a draw: a changed file is an error
            raise DatasetError(f"{self.source.path}: row {row}: id {prompt.prompt_id!r} is not the one validated "
                               "(did the files change during the run?)")
        return prompt

    def __iter__(self) -> Iterator[Prompt]:
        for k in range(len(self)):
            yield self[k]

    def find(self, prompt_id: str) -> Prompt | None:
        """The prompt with this id, or None when this set (shard) holds none."""
        sorted_hashes, positions = self._id_index()
        h = np.uint64(id_hash(prompt_id))
        lo, hi = np.searchsorted(sorted_hashes, h, "left"), np.searchsorted(sorted_hashes, h, "right")
        for position in positions[lo:hi]:
            prompt = self[int(position)]
            if prompt.prompt_id == prompt_id:
                return prompt
        return None

    def _id_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(hashes sorted, the position of each): built on first use, 16 bytes a prompt."""
        if self._index is None:
            positions = np.argsort(self.hashes, kind="stable")
            self._index = (self.hashes[positions], positions)
        return self._index

    def dataset(self):
        """The memory-mapped dataset, opened on first use; refused when it no longer has the
        rows validated (the files changed since)."""
        if self._dataset is None:
            dataset = open_by_row(self.source)
            if len(dataset) != self.num_rows:
                raise DatasetError(
                    f"{self.source.path}: read by row it has {len(dataset)} rows, but {self.num_rows} "
                    "were validated (did the files change during the run?)"
                )
            self._dataset = dataset
        return self._dataset

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_dataset": None, "_index": None}

    def __repr__(self) -> str:
        return f"DatasetPrompts({self.source.path!r}, {len(self)} of {self.num_rows} rows)"


def index_prompts(source: DatasetSource, held_out_fraction: float = 0.0, seed: int = 0) -> DatasetPrompts:
    """The ``train`` part of ``source``'s seeded split as ``DatasetPrompts``, all or nothing.

    One streamed pass validates every row (held-out rows too) and keeps the row number and id
    hash of each training row; duplicate ids are then found among the hashes. Any bad row, an
    empty set or an empty training part raises ``DatasetError`` (file and row) before anything
    is returned, exactly as ``load_prompts(source, "train", ...)`` does."""
    _check_split_args("train", held_out_fraction, None)
    stem = _stem(source)
    rows, hashes = array("q"), array("Q")
    seen = 0
    for index, row in _rows(source):
        seen += 1
        prompt = row_to_prompt(row, index, source, stem)
        if not is_held_out(prompt.meta["key"], seed, held_out_fraction):
            rows.append(index)
            hashes.append(id_hash(prompt.prompt_id))
    if seen == 0:
        raise DatasetError(f"{source.path}: empty dataset (no rows in split {source.split!r})")
    if not rows:
        raise DatasetError(f"{source.path}: none of its {seen} rows fell in the train part "
                           f"(held_out_fraction {held_out_fraction}, seed {seed})")
    prompts = DatasetPrompts(source, np.frombuffer(rows, dtype=np.int64), np.frombuffer(hashes, dtype=np.uint64), seen)
    prompts.dataset()  # converted and opened now: a failure here is one before training, too
    _refuse_duplicate_ids(prompts)
    return prompts


def _refuse_duplicate_ids(prompts: DatasetPrompts) -> None:
    """The first row (in dataset order) whose id an earlier training row has: ``DatasetError``,
    worded as ``load_prompts`` words it. Only rows with equal hashes are read."""
    sorted_hashes, positions = prompts._id_index()
    same = sorted_hashes[1:] == sorted_hashes[:-1]
    worst: tuple[int, int, str] | None = None  # (row, first row, id)
    for start in np.flatnonzero(same & ~np.concatenate(([False], same[:-1]))):  # runs of equal hashes
        end = start + 1
        while end < len(sorted_hashes) and sorted_hashes[end] == sorted_hashes[start]:
            end += 1
        first: dict[str, int] = {}
        for position in sorted(int(p) for p in positions[start:end]):  # dataset order
            prompt = prompts[position]
            if prompt.prompt_id in first and (worst is None or prompt.meta["row"] < worst[0]):
                worst = (prompt.meta["row"], first[prompt.prompt_id], prompt.prompt_id)
            first.setdefault(prompt.prompt_id, prompt.meta["row"])
    if worst is not None:
        row, first_row, prompt_id = worst
        raise DatasetError(f"{prompts.source.path}: row {row}: duplicate id {prompt_id!r} (first at row {first_row})")


# --- a run's prompts from its config (``task.dataset``) --------------------------------------


def source_from_config(task: Any) -> DatasetSource:
    """The ``DatasetSource`` of a ``TaskConfig`` (``task.dataset`` and its field mapping)."""
    fields = FieldMap(prompt=task.prompt_field, messages=task.messages_field, answer=task.answer_field,
                      id=task.id_field)
    return DatasetSource(task.dataset, split=task.dataset_split, fields=fields)


def dataset_run_prompts(cfg: Any) -> tuple[DatasetPrompts, list[Prompt]]:
    """(training prompts, held-out prompts) of a run whose ``task.dataset`` is set.

    The training part is validated row by row before anything is returned (every row of the set
    passes ``row_to_prompt`` on the way, held-out rows included), so a bad row anywhere stops
    the run before it starts and names the file and row; it comes back as ``DatasetPrompts``
    (row numbers; prompts are read when drawn). The held-out part is then streamed only as far
    as ``min(task.num_eval, eval.num_prompts)`` prompts, held as a list (evaluation reuses it).
    Dataset prompts carry no task an oracle can check, so an oracle teacher is refused here,
    before anything is read."""
    from correction_rl.config import ConfigError

    task = cfg.task
    if cfg.teacher.kind == "oracle" or cfg.eval.teacher == "oracle":
        which = "teacher.kind" if cfg.teacher.kind == "oracle" else "eval.teacher"
        raise ConfigError(
            f"task.dataset: dataset prompts carry no task an oracle can check, but {which} is 'oracle'; "
            "use teacher.kind vllm, http or human and eval.teacher: run"
        )
    source = source_from_config(task)
    train = index_prompts(source, task.held_out_fraction, task.split_seed)
    held_out = list(iter_prompts(source, "held_out", task.held_out_fraction, task.split_seed,
                                 limit=min(task.num_eval, cfg.eval.num_prompts)))
    return train, held_out
