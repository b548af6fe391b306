"""Peak memory of a run's training prompt stream over a large dataset: the list every prompt was
read into (``list``: ``PromptStream(load_prompts(...))``, what a ``task.dataset`` run held until
the stream read rows by index) vs row numbers read from the memory-mapped dataset (``rows``:
``PromptStream(index_prompts(...))``, what a run holds now; ``prompts/indexed.py``).

Each measurement is a fresh process (peak RSS is per process) that builds the stream, with the
same validation pass, from a generated chat dataset (a system and a user turn and a reference
answer per row, ~270 bytes of JSON) and draws ``--draw`` prompts. It prints one JSON line per
(format, mode) with medians over ``--repeats`` runs of: peak RSS (``VmHWM``, MB), RSS right
after the imports, the anonymous and file-backed RSS at the end (memory-mapped rows the stream
touched are file-backed: page cache the kernel can drop), and the seconds to build and to draw.
Every ``rows`` run starts with an empty ``datasets`` cache (``HF_DATASETS_CACHE``), so its time
includes converting JSONL/parquet into Arrow once (``warm_build_s``: a second run, cache kept).

Usage: ``python benchmarks/bench_prompt_stream.py [--rows 1000000] [--formats jsonl parquet]
[--modes list rows] [--repeats 3] [--draw 1000] [--data-dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = 0.01


def proc_status() -> dict[str, float]:
    """MB of the /proc/self/status memory lines (VmHWM: the peak RSS so far)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def child(mode: str, path: str, draw: int) -> None:
    sys.path.insert(0, str(ROOT))
    import datasets  # noqa: F401 - imported before the baseline, as a run has it imported

    from correction_rl.prompts.datasets import DatasetSource, FieldMap, load_prompts
    from correction_rl.prompts.indexed import index_prompts
    from correction_rl.prompts.stream import PromptStream

    start = proc_status()
    src = DatasetSource(path, fields=FieldMap(messages="conv", answer="ref", id="uid"))
    t0 = time.perf_counter()
    train = load_prompts(src, "train", HELD_OUT, 0) if mode == "list" else index_prompts(src, HELD_OUT, 0)
    stream = PromptStream(train, seed=0)
    t1 = time.perf_counter()
    drawn = sum(len(p.text) > 0 for p in stream.next_batch(draw))
    t2 = time.perf_counter()
    end = proc_status()
    assert drawn == draw
    print(json.dumps({"start_rss_mb": start["VmRSS"], "peak_rss_mb": end["VmHWM"], "end_anon_mb": end["RssAnon"],
                      "end_file_mb": end["RssFile"], "build_s": t1 - t0, "draw_s": t2 - t1,
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def generate(rows: int, folder: Path, formats: list[str]) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {}
    jsonl = folder / f"chat{rows}.jsonl"
    if "jsonl" in formats and not jsonl.exists():
        with jsonl.open("w") as f:
            for i in range(rows):
                f.write(json.dumps(_row(i)) + "\n")
    if "jsonl" in formats:
        paths["jsonl"] = jsonl
    parquet = folder / f"chat{rows}.parquet"
    if "parquet" in formats and not parquet.exists():
        writer = None
        for lo in range(0, rows, 100_000):
            table = pa.Table.from_pylist([_row(i) for i in range(lo, min(rows, lo + 100_000))])
            writer = writer or pq.ParquetWriter(parquet, table.schema)
            writer.write_table(table)
        writer.close()
    if "parquet" in formats:
        paths["parquet"] = parquet
    return paths


def _row(i: int) -> dict:
    return {"uid": f"r{i}", "ref": f"The corrected sentence number {i}.",
            "conv": [{"role": "system", "content": "Fix the spelling and grammar; change nothing else."},
                     {"role": "user", "content": f"Fix: teh sentense numbr {i} has sevral mistaks in it, "
                                                 "and it goes on for a while to look like real text."}]}


def run_child(mode: str, path: Path, draw: int, cache: str) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": cache, "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path), "--draw", str(draw)],
                         env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise SystemExit(f"child {mode} {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--formats", nargs="+", default=["jsonl", "parquet"], choices=["jsonl", "parquet"])
    p.add_argument("--modes", nargs="+", default=["list", "rows"], choices=["list", "rows"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--draw", type=int, default=1000)
    p.add_argument("--data-dir", default=None, help="where the generated files are kept (reused if present)")
    p.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], a.draw)
    folder = Path(a.data_dir or tempfile.mkdtemp(prefix="bench-prompts-"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = generate(a.rows, folder, a.formats)
    for fmt, path in paths.items():
        for mode in a.modes:
            runs = []
            warm = None
            for _ in range(a.repeats):
                with tempfile.TemporaryDirectory(prefix="hf-cache-") as cache:
                    runs.append(run_child(mode, path, a.draw, cache))
                    if mode == "rows" and warm is None:
                        warm = run_child(mode, path, a.draw, cache)["build_s"]
            med = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
            print(json.dumps({"format": fmt, "mode": mode, "rows": a.rows, "file_mb": round(path.stat().st_size / 2**20, 1),
                              "draw": a.draw, "repeats": a.repeats, **med,
                              "peak_rss_runs_mb": [round(r["peak_rss_mb"]) for r in runs],
                              **({"warm_build_s": round(warm, 2)} if warm is not None else {})}), flush=True)


if __name__ == "__main__":
    main()
