"""Prompt sets held as datasets: JSONL, parquet, ``save_to_disk`` directories or a hub id, read
through the ``datasets`` library into ``Prompt`` records.

Why the ``datasets`` library and not our JSONL reader (``files.py``): users keep prompt sets in
the formats the library writes (parquet shards, ``save_to_disk`` Arrow directories, hub
datasets), under their own column names, often with chat ``messages`` instead of plain text.

Three properties matter at scale, and each shapes the code below:

* **Streaming.** A million-row set must not load into memory. Files are read with
  ``load_dataset(..., streaming=True)`` (an ``IterableDataset``: JSON in 1 MB chunks, parquet
  10,000 rows at a time); ``save_to_disk`` directories are memory-mapped Arrow (``load_from_disk``), so
  iterating them pages rows in from disk. ``iter_prompts`` yields prompts as rows arrive. A
  run's *training* prompts are not collected either: ``prompts/indexed.py`` keeps their row
  numbers and reads each prompt by row (``open_by_row``) when the stream draws it.
* **A split that needs no whole set.** Whether a row is held out is decided from a hash of the
  seed and the row's key (its id field, else its index), row by row, so train and held-out
  prompts are disjoint and reproducible without counting or shuffling the set first. With an id
  field the split also survives reordering or appending rows.
* **Errors that name the file and the row.** A missing field, a wrong type or an empty set is a
  ``DatasetError`` whose message starts with ``<source>: row <i>:`` (``i`` counts rows from 0 in
  the order the dataset yields them). ``load_prompts`` validates every row before it returns, so
  a bad row anywhere means no prompts at all, never a half-loaded set.

A chat row becomes a ``Prompt`` whose ``messages`` hold the whole conversation as
``[{"role": ..., "content": ...}]`` (rendered with the policy's chat template,
``prompts/render.py``) and whose ``text`` is its last (user) message.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from correction_rl.errors import UserError
from correction_rl.types import Prompt

SplitName = Literal["train", "held_out", "all"]
SPLIT_NAMES: tuple[str, ...] = ("train", "held_out", "all")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
"""File suffix -> ``datasets`` builder. (A directory of such files is read as one set.)"""
BATCH_ROWS = 256
"""Rows fetched from the reader at a time."""
JSON_CHUNK_BYTES = 1 << 20
"""JSON is parsed this many bytes at a time: the memory a JSONL stream holds at once."""
PARQUET_BATCH_ROWS = 10_000
"""Parquet is read this many rows at a time (the library's default is a whole row group, which
writers often make 100k+ rows: ~90 MB more peak memory on a 1M-row chat set)."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DatasetError(UserError, ValueError):
    """A prompt dataset problem; the message names the source (and the row, for a bad row)."""


@dataclass(frozen=True)
class FieldMap:
    """Which columns hold what. ``messages``, when set, takes precedence over ``prompt``."""

    prompt: str | None = "prompt"
    """Column of the prompt text (a non-empty string)."""
    messages: str | None = None
    """Column of a chat conversation: a list of ``{"role": str, "content": str}`` ending with a
    ``user`` turn (the prompt the policy answers)."""
    answer: str | None = None
    """Optional column of a reference answer (string or null) for evaluation."""
    id: str | None = None
    """Optional column of a stable row id (string or int): the prompt id and the split key.
    Without it the row index is used, so the split then depends on the row order."""

    def __post_init__(self) -> None:
        if not self.prompt and not self.messages:
            raise DatasetError("field mapping: set a prompt field or a messages field")


@dataclass(frozen=True)
class DatasetSource:
    """Where a prompt set lives and which rows of it to take."""

    path: str
    """A ``.jsonl``/``.json``/``.parquet`` file, a directory of such files, a ``save_to_disk``
    directory, or a hub id (``owner/name``; needs a machine that can reach the hub)."""
    split: str = "train"
    """The dataset's own split name (``save_to_disk`` ``DatasetDict`` keys, hub splits). Local
    files have one split, ``train``."""
    fields: FieldMap = FieldMap()
    task: str = ""
    """Task label given to every prompt (``Prompt.task``)."""


def iter_prompts(
    source: DatasetSource,
    split: SplitName = "all",
    held_out_fraction: float = 0.0,
    seed: int = 0,
    limit: int | None = None,
) -> Iterator[Prompt]:
    """Prompts of ``source`` as its rows stream in: the ``train`` or ``held_out`` part of the
    seeded split (``all``: every row), at most ``limit`` of them.

    Reads only as far as needed: taking the first ``limit`` prompts of a large file reads its
    first chunks, not the file. Raises ``DatasetError`` at the first bad row, and when the
    source (or the requested part of it) turns out to hold no rows."""
    _check_split_args(split, held_out_fraction, limit)
    rows = 0
    produced = 0
    if limit == 0:
        return
    stem = _stem(source)
    for index, row in _rows(source):
        rows += 1
        prompt = row_to_prompt(row, index, source, stem)
        if split != "all" and (split == "held_out") != is_held_out(prompt.meta["key"], seed, held_out_fraction):
            continue
        produced += 1
        yield prompt
        if limit is not None and produced >= limit:
            return
    if rows == 0:
        raise DatasetError(f"{source.path}: empty dataset (no rows in split {source.split!r})")
    if produced == 0:
        raise DatasetError(
            f"{source.path}: none of its {rows} rows fell in the {split} part "
            f"(held_out_fraction {held_out_fraction}, seed {seed})"
        )


def load_prompts(
    source: DatasetSource,
    split: SplitName = "all",
    held_out_fraction: float = 0.0,
    seed: int = 0,
    limit: int | None = None,
) -> list[Prompt]:
    """``iter_prompts`` collected into a list, all or nothing: any bad row (up to ``limit``
    prompts) raises before a single prompt is returned. Duplicate prompt ids are refused here
    (``iter_prompts`` holds no ids; ``indexed.index_prompts`` compares 64-bit hashes of them).
    It holds every prompt, so it is for sets that fit in memory; a run's training prompts go
    through ``indexed.index_prompts`` instead (row numbers, the same validation)."""
    prompts = list(iter_prompts(source, split, held_out_fraction, seed, limit))
    seen: dict[str, int] = {}
    for prompt in prompts:
        row = prompt.meta["row"]
        if prompt.prompt_id in seen:
            raise DatasetError(
                f"{source.path}: row {row}: duplicate id {prompt.prompt_id!r} (first at row {seen[prompt.prompt_id]})"
            )
        seen[prompt.prompt_id] = row
    return prompts


def is_held_out(key: str, seed: int, fraction: float) -> bool:
    """The split of one row: a hash of the seed and the row key, below ``fraction`` -> held out."""
    digest = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


# --- one row -> one Prompt ------------------------------------------------------------------


def row_to_prompt(row: dict[str, Any], index: int, source: DatasetSource, stem: str | None = None) -> Prompt:
    """Validate one row against the field mapping; ``DatasetError`` naming source and row."""
    fields = source.fields
    where = f"{source.path}: row {index}"
    key = str(index)
    if fields.id:
        value = _field(row, fields.id, where)
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise DatasetError(f"{where}: field {fields.id!r} (id) must be a string or an int, got {_show(value)}")
        key = str(value)
    meta: dict[str, Any] = {"source": source.path, "row": index, "key": key}
    messages = None
    if fields.messages:
        messages = _messages(_field(row, fields.messages, where), fields.messages, where)
        text = messages[-1]["content"]
    else:
        text = _field(row, fields.prompt, where)
        if not isinstance(text, str):
            raise DatasetError(f"{where}: field {fields.prompt!r} (prompt) must be a string, got {_show(text)}")
        if not text.strip():
            raise DatasetError(f"{where}: field {fields.prompt!r} (prompt) is empty")
    answer = None
    if fields.answer:
        if fields.answer not in row:
            raise DatasetError(f"{where}: missing field {fields.answer!r} (answer); fields: {sorted(row)}")
        answer = row[fields.answer]
        if answer is not None and not isinstance(answer, str):
            raise DatasetError(f"{where}: field {fields.answer!r} (answer) must be a string or null, got {_show(answer)}")
    return Prompt(prompt_id=f"{stem or _stem(source)}-{key}", text=text, task=source.task, answer=answer, meta=meta,
                  messages=messages)


def _stem(source: DatasetSource) -> str:
    """Prompt ids are ``<stem>-<row key>``: the file or directory name without suffix."""
    return Path(source.path.rstrip("/")).stem or "dataset"


def _field(row: dict[str, Any], name: str, where: str) -> Any:
    # Rows of one file share a schema: a key another row has is None in this one, so absent
    # and null are the same to us (both "missing").
    value = row.get(name)
    if value is None:
        state = "null" if name in row else "absent"
        raise DatasetError(f"{where}: missing field {name!r} ({state}); fields: {sorted(row)}")
    return value


def _messages(value: Any, name: str, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{where}: field {name!r} (messages) must be a non-empty list of "
                           f"{{role, content}} objects, got {_show(value)}")
    out = []
    for i, message in enumerate(value):
        at = f"{where}: field {name!r} message {i}"
        if not isinstance(message, dict):
            raise DatasetError(f"{at}: must be an object with 'role' and 'content', got {_show(message)}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise DatasetError(f"{at}: 'role' must be a non-empty string, got {_show(role)}")
        if not isinstance(content, str):
            raise DatasetError(f"{at}: 'content' must be a string, got {_show(content)}")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise DatasetError(
            f"{where}: field {name!r} (messages) must end with a 'user' turn (the prompt), ends with "
            f"{out[-1]['role']!r}; drop the final answer, or map it with the answer field"
        )
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


# --- reading rows ---------------------------------------------------------------------------


def _rows(source: DatasetSource) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, row) pairs, streamed; a reader failure (bad JSON, unreadable file) becomes a
    ``DatasetError`` naming the source and the row it stopped at.

    Rows are fetched in batches of ``BATCH_ROWS`` (the library's row-by-row iteration costs
    ~8x more per row) and handed out one by one."""
    batches = _open(source).iter(batch_size=BATCH_ROWS)
    index = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except DatasetError:
            raise
        except Exception as exc:  # pyarrow / datasets reader errors: the file is malformed
            raise DatasetError(f"{source.path}: {_reader_row(exc, index)}: could not read the data "
                               f"({type(exc).__name__}: {exc})") from exc
        keys = list(batch)
        for values in zip(*batch.values()):
            yield index, dict(zip(keys, values))
            index += 1


def _reader_row(exc: Exception, index: int) -> str:
    """Where a reader failed. JSON is parsed a chunk at a time and a chunk's rows are yielded
    only once it parsed, so ``index`` is the chunk's first row and pyarrow's "in row N" counts
    from there."""
    found = re.search(r"in row (\d+)", str(exc))
    return f"row {index + int(found.group(1))}" if found else f"row {index} or after"


def open_by_row(source: DatasetSource):
    """``source`` as a random-access ``datasets.Dataset``: memory-mapped Arrow, so reading row
    ``i`` pages in that row only. ``save_to_disk`` directories are opened as they are; files
    (and hub sets) are converted once into the library's Arrow cache (``HF_DATASETS_CACHE``,
    reused while the files are unchanged). Call it on a source ``iter_prompts`` read through:
    its rows come in the same order (the same reader, not streamed)."""
    return _open(source, streaming=False)


def _open(source: DatasetSource, streaming: bool = True):
    """A ``datasets`` ``Dataset`` (memory-mapped) or ``IterableDataset`` (streamed) of the rows;
    ``streaming=False``: always a ``Dataset``."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(source.path)
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return _from_disk(source, path)
        _check_split_name(source, ["train"])
        return _load_files(source, _data_files(path), _builder_of_dir(path), streaming)
    if path.suffix in FILE_BUILDERS:
        if not path.exists():
            raise DatasetError(f"{source.path}: file not found")
        if path.stat().st_size == 0:
            raise DatasetError(f"{source.path}: empty dataset (the file is empty)")
        _check_split_name(source, ["train"])
        return _load_files(source, [str(path)], FILE_BUILDERS[path.suffix], streaming)
    if path.exists():
        raise DatasetError(f"{source.path}: unsupported file type {path.suffix!r}; allowed: {sorted(FILE_BUILDERS)}")
    if _HUB_ID.match(source.path):
        try:
            return datasets.load_dataset(source.path, split=source.split, streaming=streaming)
        except Exception as exc:  # offline machine, unknown id, unknown split
            raise DatasetError(f"{source.path}: no such local path, and could not open it as a hub dataset ({type(exc).__name__}: {exc})") from exc
    raise DatasetError(f"{source.path}: no such file or directory (nor a hub id 'owner/name')")


def _from_disk(source: DatasetSource, path: Path):
    """A ``save_to_disk`` directory: memory-mapped Arrow, so iterating pages rows in lazily."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets 5.2 fails with IndexError on a directory of 0 rows
        if (path / "state.json").exists() and _arrow_rows(path) == 0:
            raise DatasetError(f"{source.path}: empty dataset (no rows in split {source.split!r})") from None
        raise DatasetError(f"{source.path}: could not open the save_to_disk directory ({type(exc).__name__}: {exc})") from exc
    if isinstance(loaded, datasets.DatasetDict):
        _check_split_name(source, list(loaded))
        loaded = loaded[source.split]
    if len(loaded) == 0:
        raise DatasetError(f"{source.path}: empty dataset (no rows in split {source.split!r})")
    return loaded


def _arrow_rows(path: Path) -> int:
    """Rows in a ``save_to_disk`` Dataset directory, counted from its memory-mapped Arrow files
    (only used to explain a directory ``load_from_disk`` refused)."""
    import json

    import pyarrow as pa

    total = 0
    for entry in json.loads((path / "state.json").read_text()).get("_data_files", []):
        with pa.memory_map(str(path / entry["filename"])) as source:
            total += sum(batch.num_rows for batch in pa.ipc.open_stream(source))
    return total


def _load_files(source: DatasetSource, files: list[str], builder: str, streaming: bool = True):
    import datasets

    # on_mixed_types=None: by default the JSON reader turns a column of mixed types into JSON
    # values and decodes its strings again ("0" becomes 0), silently; strict typing makes such
    # a row an error naming the column and the row instead.
    options = ({"chunksize": JSON_CHUNK_BYTES, "on_mixed_types": None} if builder == "json"
               else {"batch_size": PARQUET_BATCH_ROWS})
    try:
        stream = datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming, **options)
    except Exception as exc:
        raise DatasetError(f"{source.path}: could not open ({type(exc).__name__}: {exc})") from exc
    return stream


def _data_files(path: Path) -> list[str]:
    files = sorted(str(f) for f in path.iterdir() if f.suffix in FILE_BUILDERS and f.stat().st_size > 0)
    if not files:
        raise DatasetError(
            f"{path}: empty dataset (a directory with no {sorted(FILE_BUILDERS)} files, and not a "
            "save_to_disk directory: no state.json or dataset_dict.json)"
        )
    return files


def _builder_of_dir(path: Path) -> str:
    builders = {FILE_BUILDERS[f.suffix] for f in path.iterdir() if f.suffix in FILE_BUILDERS}
    if len(builders) > 1:
        raise DatasetError(f"{path}: mixes JSON and parquet files; keep one format per directory")
    return builders.pop()


def _check_split_name(source: DatasetSource, available: Iterable[str]) -> None:
    available = list(available)
    if source.split not in available:
        raise DatasetError(f"{source.path}: no split {source.split!r}; available: {available}")


def _check_split_args(split: str, fraction: float, limit: int | None) -> None:
    if split not in SPLIT_NAMES:
        raise DatasetError(f"unknown split {split!r}; allowed: {list(SPLIT_NAMES)}")
    if not 0.0 <= fraction < 1.0:
        raise DatasetError(f"held_out_fraction must be in [0, 1), got {fraction}")
    if split == "held_out" and fraction == 0.0:
        raise DatasetError("split 'held_out' with held_out_fraction 0 selects no rows")
    if limit is not None and limit < 0:
        raise DatasetError(f"limit must be >= 0, got {limit}")
