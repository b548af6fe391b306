"""The training stream over a dataset (correction_rl/prompts/indexed.py + stream.py): it keeps row
numbers, not prompts, and draws exactly what the list-based stream drew (same prompts, same
order, same state, checkpoints interchangeable), in one process and as Ray rollout shards."""

from __future__ import annotations

import gc
import json
import pickle
import random

import pytest

datasets = pytest.importorskip("datasets")

from correction_rl.prompts.datasets import DatasetError, DatasetSource, FieldMap, load_prompts  # noqa: E402
from correction_rl.prompts.indexed import DatasetPrompts, index_prompts  # noqa: E402
from correction_rl.prompts.stream import PromptStream  # noqa: E402
from correction_rl.types import Prompt  # noqa: E402

FIELDS = FieldMap(messages="conv", answer="ref", id="uid")


def chat_rows(n: int, start: int = 0) -> list[dict]:
    return [{"uid": f"c{i}", "ref": None if i % 7 == 0 else f"the {i}",
             "conv": [{"role": "system", "content": f"Be brief <{i}>."}, {"role": "user", "content": f"Fix: teh {i}"}]}
            for i in range(start, start + n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sources(tmp_path, rows) -> dict[str, DatasetSource]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet", row_group_size=50)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "chat"))
    paths = {"jsonl": write_jsonl(tmp_path / "chat.jsonl", rows), "parquet": tmp_path / "chat.parquet",
             "disk": tmp_path / "chat"}
    return {k: DatasetSource(str(p), fields=FIELDS, task="fix") for k, p in paths.items()}


def as_json(prompts) -> list[dict]:
    return [p.to_json() for p in prompts]


def ids(batch) -> list[str]:
    return [p.prompt_id for p in batch]


def test_list_stream_keeps_its_reference_order():
    """Built-in tasks and prompt files: the order is ``random.Random(f"{seed}:{epoch}")``
    shuffling the list of positions, epoch after epoch (the state checkpoints store)."""
    prompts = [Prompt(prompt_id=f"p{k}", text=f"q{k}") for k in range(37)]
    expected = []
    for epoch in range(3):
        order = list(range(37))
        random.Random(f"11:{epoch}").shuffle(order)
        expected += [f"p{k}" for k in order]
    assert ids(PromptStream(prompts, seed=11).next_batch(3 * 37)) == expected


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "disk"])
def test_dataset_prompts_are_the_loaded_prompts_and_draw_in_the_same_order(tmp_path, kind):
    """Against the list a run used to hold (``load_prompts(..., "train")``): the same records,
    the same draws over three epochs, and states that load into either stream, replay and skip
    included; Ray shards (``[i::n]``, seeds per worker) draw what list shards drew."""
    src = sources(tmp_path, chat_rows(120))[kind]
    ref = load_prompts(src, "train", held_out_fraction=0.25, seed=7)
    rows = index_prompts(src, held_out_fraction=0.25, seed=7)
    assert isinstance(rows, DatasetPrompts) and len(rows) == len(ref) and 70 < len(ref) < 110
    assert as_json(rows) == as_json(ref) and as_json([rows[-1]]) == as_json([ref[-1]])
    assert rows[3].messages[0] == {"role": "system", "content": f"Be brief <{ref[3].meta['key'][1:]}>."}
    old, new = PromptStream(ref, seed=5), PromptStream(rows, seed=5)
    assert as_json(new.next_batch(len(ref) * 3 + 4)) == as_json(old.next_batch(len(ref) * 3 + 4))
    assert new.state_dict() == old.state_dict()
    order = ids(PromptStream(ref, seed=5).next_batch(len(ref)))
    state = {"epoch": 0, "position": 4, "replay": [order[9], "chat-c999", "nope"], "skip": {order[6]: 1, "x": 2}}
    for a, b in ((PromptStream(ref, seed=5), PromptStream(rows, seed=5)),
                 (PromptStream(rows, seed=5), PromptStream(ref, seed=5))):
        a.load_state_dict(state)
        a.account_for_logged([order[9], order[12], "elsewhere"])
        assert a.state.replay == [] and a.state.skip == {order[6]: 1, order[12]: 1}
        b.load_state_dict(a.state_dict())  # a checkpoint written by one, resumed by the other
        assert ids(a.next_batch(60)) == ids(b.next_batch(60))
        assert b.state_dict() == a.state_dict()
    for w in range(3):
        shard = pickle.loads(pickle.dumps(rows[w::3]))  # what ray.put hands a rollout worker
        assert isinstance(shard, DatasetPrompts) and shard.find(ref[w].prompt_id).prompt_id == ref[w].prompt_id
        assert shard.find(ref[w + 1].prompt_id) is None  # another worker's prompt
        assert as_json(PromptStream(shard, seed=w).next_batch(50)) == as_json(PromptStream(ref[w::3], seed=w).next_batch(50))


def live_prompts() -> int:
    gc.collect()
    return sum(type(o) is Prompt for o in gc.get_objects())


def test_a_run_over_a_dataset_holds_row_numbers_not_prompts(tmp_path):
    """The run's training set from its config (``train_and_held_out``), its stream and 60
    draws: live ``Prompt`` objects stay at the held-out set plus the draws, where the old list
    held all 3,000 of them; the set pickles (a Ray shard) at ~16 bytes a prompt."""
    from correction_rl.config import load_config
    from correction_rl.prompts.split import train_and_held_out

    rows = [{"q": f"question number {i} " + "x" * 200} for i in range(4000)]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    cfg = load_config(overrides={"task": {"dataset": str(path), "prompt_field": "q", "held_out_fraction": 0.25},
                                 "teacher": {"kind": "human"}, "eval": {"teacher": "run", "num_prompts": 5}})
    before = live_prompts()
    train, held_out = train_and_held_out(cfg)
    stream = PromptStream(train, seed=cfg.seed)
    drawn = stream.next_batch(60)
    assert 2800 < len(train) < 3200 and len(held_out) == 5 and len(drawn) == 60
    assert live_prompts() - before <= 5 + 60 + 5, "the stream holds prompts it has not drawn"
    assert not any(isinstance(v, list) and len(v) > 100 for v in vars(stream).values())
    assert not any(isinstance(v, list) and len(v) > 100 for v in vars(stream.prompts).values())
    assert len(pickle.dumps(train)) < 20 * len(train) + 2000
    assert as_json(drawn) == as_json(PromptStream(load_prompts(
        DatasetSource(str(path), fields=FieldMap(prompt="q")), "train", 0.25, cfg.task.split_seed), seed=cfg.seed).next_batch(60))


def test_bad_sets_fail_before_anything_is_returned(tmp_path):
    """The validation pass still streams every row first: file and row in the error, no set."""
    rows = chat_rows(30)
    dup = write_jsonl(tmp_path / "dup.jsonl", rows[:5] + [{**rows[8], "uid": "c2"}] + rows[5:])
    with pytest.raises(DatasetError, match=r"dup.jsonl: row 5: duplicate id 'dup-c2' \(first at row 2\)"):
        index_prompts(DatasetSource(str(dup), fields=FIELDS))
    bad = write_jsonl(tmp_path / "bad.jsonl", rows + [{**rows[0], "uid": "z", "conv": []}])
    with pytest.raises(DatasetError, match=r"bad.jsonl: row 30: field 'conv' \(messages\) must be a non-empty list"):
        index_prompts(DatasetSource(str(bad), fields=FIELDS), held_out_fraction=0.5, seed=1)
    ok = DatasetSource(str(write_jsonl(tmp_path / "ok.jsonl", rows)), fields=FIELDS)
    with pytest.raises(DatasetError, match="none of its 30 rows fell in the train part"):
        index_prompts(ok, held_out_fraction=1 - 1e-12)


def test_a_set_whose_files_changed_is_refused_when_reopened(tmp_path):
    """A worker reopens the dataset by path: if the file no longer has the validated rows (their
    number, or a row's id), its first draw is a clear error, not other prompts."""
    path = write_jsonl(tmp_path / "grow.jsonl", chat_rows(20))
    shard = pickle.dumps(index_prompts(DatasetSource(str(path), fields=FIELDS))[0::2])
    write_jsonl(path, chat_rows(25))
    with pytest.raises(DatasetError, match=r"grow.jsonl: read by row it has 25 rows, but 20 were validated"):
        PromptStream(pickle.loads(shard), seed=0).next_batch(1)
    renamed = write_jsonl(tmp_path / "renamed.jsonl", chat_rows(20))
    rows = pickle.dumps(index_prompts(DatasetSource(str(renamed), fields=FIELDS)))
    write_jsonl(renamed, [{**r, "uid": f"x{i}"} for i, r in enumerate(chat_rows(20))])  # same count, other ids
    with pytest.raises(DatasetError, match=r"renamed.jsonl: row \d+: id 'renamed-x\d+' is not the one validated"):
        PromptStream(pickle.loads(rows), seed=0).next_batch(1)


def test_ray_rollout_shards_read_their_own_rows(tmp_path, ray_local):
    """``start_cluster`` puts ``train[i::n]`` in the object store for worker ``i``: over Ray the
    shard arrives as rows and draws what the list shard drew."""
    ray = ray_local
    src = sources(tmp_path, chat_rows(60))["parquet"]
    ref = load_prompts(src, "train", 0.2, 3)
    rows = index_prompts(src, 0.2, 3)

    @ray.remote(num_cpus=0)
    def draw(shard, seed):
        from correction_rl.prompts.stream import PromptStream

        return type(shard).__name__, [p.to_json() for p in PromptStream(shard, seed=seed).next_batch(30)]

    got = ray.get([draw.remote(ray.put(rows[w::2]), 1000 + w) for w in range(2)], timeout=120)
    assert got == [("DatasetPrompts", as_json(PromptStream(ref[w::2], seed=1000 + w).next_batch(30))) for w in range(2)]


def test_an_inprocess_run_trains_on_dataset_rows_in_the_lists_order(tmp_path, tiny_model_dir):
    """A real in-process run over a JSONL dataset (human teacher answered through its queue by
    a thread): the prompts it sends to the teacher are the rows the list-based stream draws."""
    import threading

    from correction_rl.config import config_from_dict
    from correction_rl.run.inprocess import run
    from correction_rl.teachers.human.queue import CorrectionQueue

    path = write_jsonl(tmp_path / "sums.jsonl", [{"uid": f"s{i}", "q": f"{i}+{i}="} for i in range(300)])
    cfg = config_from_dict({
        "name": "ds", "output_dir": str(tmp_path), "mode": "inprocess", "total_steps": 2, "seed": 3,
        "model": {"path": str(tiny_model_dir)},
        "task": {"dataset": str(path), "prompt_field": "q", "id_field": "uid", "held_out_fraction": 0.1, "num_eval": 4},
        "rollout": {"engine": "hf", "batch_size": 4, "max_new_tokens": 4},
        "teacher": {"kind": "human", "human": {"serve": False, "wait_s": 60}},
        "learner": {"backend": "torch", "micro_batch_pairs": 4},
        "buffer": {"min_fresh_pairs": 2, "max_staleness": 1},
        "eval": {"every_steps": 0, "num_prompts": 4, "sampled": False, "teacher": "run"},
        "metrics": {"wandb_mode": "disabled"},
    })
    stop = threading.Event()

    def annotator() -> None:
        db = cfg.run_dir / "human_queue.sqlite"
        while not stop.is_set() and not db.exists():
            stop.wait(0.05)
        queue = CorrectionQueue(db)
        while not stop.is_set():
            item = queue.lease("carol")
            if item is None:
                stop.wait(0.05)
                continue
            queue.complete(item.item_id, "carol", item.response + "0" if len(item.response) < 3 else item.response[:-1])

    worker = threading.Thread(target=annotator, daemon=True)
    worker.start()
    try:
        run(cfg)
    finally:
        stop.set()
        worker.join(10)
    logged = [json.loads(line) for line in (cfg.run_dir / "corrections.jsonl").read_text().splitlines()]
    sent = [r["pair"]["prompt_id"] for r in logged if r.get("type") == "pair"]
    ref = load_prompts(DatasetSource(str(path), fields=FieldMap(prompt="q", id="uid")), "train", 0.1, 0)
    drawn = ids(PromptStream(ref, seed=cfg.seed).next_batch(len(ref)))
    assert sent and set(sent) <= set(drawn[:4 * 10]) and drawn[0] in sent
    steps = [json.loads(line).get("step") for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps[-1] == 2
