"""``correction-rl report RUN_DIR``: plots and one HTML page from a run directory alone.

W&B is the live view; this is the view that needs nothing but the files a run leaves behind
(docs/run_directory.md): ``metrics.jsonl`` (every logged dict), ``corrections.jsonl`` (the
durable log of every pair), ``eval_before.json`` / ``eval_after.json`` and ``config.yaml``. It
works offline, after the fact, on a copy of the directory, and for runs made with W&B disabled.

Output, under ``RUN_DIR/report/`` (or ``--out``):

* one PNG per question a user asks of a run — did the held-out correction rate fall
  (``heldout_correction_rate.png``), how much does the teacher still change
  (``edit_distance.png``), is the loss falling and the margin rising (``loss_margin.png``), how
  fast is it (``throughput.png``), how stale is the data (``staleness.png``), what do weight
  syncs cost (``sync_time.png``);
* ``index.html``: a summary (before/after table, totals), the plots, a sample of corrections
  with their diffs, and the resolved config. It is one self-contained file (plots embedded as
  data URIs) that can be mailed or uploaded as is, carries no script, and forbids scripts with a
  Content-Security-Policy; every text from the run is HTML-escaped (``diffs.py``).

matplotlib is imported lazily with the Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from correction_rl.observe.diffs import TokenRenderer, diff_segments, pair_text, segments_html
from correction_rl.observe.run_files import RunData, Series, derived_series, load_run, series
from correction_rl.types import CorrectionPair

__all__ = ["PLOTS", "Report", "RunData", "load_run", "sample_pairs", "series", "derived_series",
           "write_report", "cli"]

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


# ---------------------------------------------------------------------------------------------
# Plots


@dataclass(frozen=True)
class Panel:
    """One axes: a y label and the series drawn on it, each as (label, candidate keys); the
    first key the run has is drawn (the two drivers name a few things differently)."""

    ylabel: str
    lines: tuple[tuple[str, tuple[str, ...]], ...]
    xlabel: str = "learner step"
    hline_from_config: str | None = None
    """Dotted config field drawn as a dashed reference line (e.g. ``buffer.max_staleness``)."""


@dataclass(frozen=True)
class PlotSpec:
    filename: str
    title: str
    caption: str
    panels: tuple[Panel, ...]


PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec(
        "heldout_correction_rate.png", "Held-out correction rate",
        "Fraction of held-out answers the teacher had to change (lower is better), greedy and "
        "sampled decoding, and the task accuracy.",
        (Panel("correction rate", (("greedy", ("eval/greedy/correction_rate",)),
                                   ("sampled", ("eval/sampled/correction_rate",)))),
         Panel("accuracy", (("greedy", ("eval/greedy/accuracy",)),
                            ("sampled", ("eval/sampled/accuracy",))))),
    ),
    PlotSpec(
        "edit_distance.png", "Amount of correction (edit distance)",
        "Mean token edit distance between y and y': on held-out prompts, on each step's fresh "
        "training pairs, and over the correction log by the policy version that produced y.",
        (Panel("held-out edit distance", (("greedy", ("eval/greedy/mean_edit_distance",)),
                                          ("sampled", ("eval/sampled/mean_edit_distance",)))),
         Panel("training pairs", (("teacher (per step)", ("teacher/mean_edit_distance",)),)),
         Panel("correction log", (("mean edit distance", ("report/log_edit_distance",)),
                                  ("no-op rate", ("report/log_noop_rate",))), xlabel="policy version")),
    ),
    PlotSpec(
        "loss_margin.png", "Loss and margins",
        "The objective's loss, the margin log pi(y'|x) - log pi(y|x) (should rise), and the two "
        "sequence log-probs it is made of.",
        (Panel("loss", (("train/loss", ("train/loss",)),)),
         Panel("margin (nats)", (("margin", ("train/margin",)),)),
         Panel("log-prob (nats)", (("log pi(y'|x)", ("train/chosen_logp",)),
                                   ("log pi(y|x)", ("train/rejected_logp",))))),
    ),
    PlotSpec(
        "throughput.png", "Throughput",
        "Pairs trained per second (end to end, from the metric timestamps; the Ray driver's "
        "own count where logged), rollout tokens per second, and teacher pairs per second "
        "while correcting (in-process loop).",
        (Panel("learner pairs / s", (("end to end", ("report/pairs_per_s",)),
                                     ("Ray driver", ("system/pairs_per_s",)))),
         Panel("rollout tokens / s", (("rollout", ("rollout/tokens_per_s", "report/rollout_tokens_per_s")),)),
         Panel("teacher pairs / s", (("teacher", ("teacher/pairs_per_s",)),))),
    ),
    PlotSpec(
        "staleness.png", "Staleness",
        "Learner version minus the version that produced y, over each trained batch (mean and "
        "max); the dashed line is buffer.max_staleness.",
        (Panel("staleness (versions)", (
            ("batch mean", ("buffer/batch_staleness_mean", "buffer/last_batch_staleness_mean")),
            ("batch max", ("buffer/batch_staleness_max", "buffer/last_batch_staleness_max")),
            ("all sampled, mean", ("buffer/sampled_staleness_mean",))),
            hline_from_config="buffer.max_staleness"),),
    ),
    PlotSpec(
        "sync_time.png", "Weight sync",
        "Seconds per weight sync (learner export to every engine loaded) and its bandwidth.",
        (Panel("seconds", (("sync", ("sync/seconds",)),)),
         Panel("GB/s", (("sync", ("sync/gb_per_s",)),))),
    ),
)


SMOOTH_ABOVE = 30
"""Series longer than this are drawn faintly with a rolling mean on top."""


def rolling_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _config_value(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def render_plot(spec: PlotSpec, data: RunData, derived: dict[str, Series], path: Path) -> list[str]:
    """Draw ``spec`` to ``path``; returns the keys that were drawn (empty panels say so)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede any pyplot import elsewhere in the process
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(spec.panels), 3.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(spec.title, fontsize=12)
    drawn: list[str] = []
    for i, panel in enumerate(spec.panels):
        ax = fig.add_subplot(1, len(spec.panels), i + 1)
        any_line = smoothed = False
        for label, keys in panel.lines:
            for key in keys:
                xs, ys = derived.get(key) or series(data.metrics, key)
                if not xs:
                    continue
                if len(xs) > SMOOTH_ABOVE:  # a noisy per-step series: faint raw + rolling mean
                    (line,) = ax.plot(xs, ys, alpha=0.3, linewidth=0.8)
                    ax.plot(xs, rolling_mean(ys, max(3, len(ys) // 15)), color=line.get_color(),
                            label=f"{label} (rolling mean)")
                    smoothed = True
                else:
                    ax.plot(xs, ys, marker="o" if len(xs) <= 20 else None, markersize=3, label=label)
                drawn.append(key)
                any_line = True
                break
        ref = _config_value(data.config, panel.hline_from_config) if panel.hline_from_config else None
        if any_line and isinstance(ref, (int, float)):
            ax.axhline(ref, linestyle="--", color="grey", linewidth=1, label=panel.hline_from_config)
        if not any_line:
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
        if any_line and (len(panel.lines) > 1 or ref is not None or smoothed):
            ax.legend(fontsize=8)
    fig.savefig(path)
    return drawn


# ---------------------------------------------------------------------------------------------
# The page


def find_tokenizer(data: RunData, override: str | None = None) -> tuple[Any | None, str]:
    """The tokenizer that decodes the log's token ids, and where it came from: ``override``, the
    run's saved ``policy/`` (when it holds tokenizer files), else the config's ``model.path``
    (absolute, or relative to the current directory). None when none loads: the page then shows
    token ids."""
    candidates = [Path(override)] if override else []
    candidates.append(data.run_dir / "policy")
    model_path = _config_value(data.config, "model.path")
    if model_path:
        candidates.append(Path(model_path))
    for path in candidates:
        if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
            from correction_rl.models import load_tokenizer

            try:
                return load_tokenizer(path), str(path)
            except Exception as exc:  # a broken directory: try the next one, say why on the page
                data.notes.append(f"tokenizer at {path} did not load: {type(exc).__name__}: {exc}")
    if override:
        raise FileNotFoundError(f"--tokenizer {override}: no tokenizer files there")
    return None, ""


def sample_pairs(pairs: Sequence[CorrectionPair], n: int) -> list[CorrectionPair]:
    """``n`` corrected pairs (y' != y) spread evenly over the log, first and last included, so the
    sample shows the start of the run and its end."""
    changed = [p for p in pairs if not p.is_noop]
    if n <= 0 or not changed:
        return []
    if len(changed) <= n:
        return changed
    if n == 1:
        return [changed[-1]]
    idx = sorted({round(i * (len(changed) - 1) / (n - 1)) for i in range(n)})
    return [changed[i] for i in idx]


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, fmt: str = ".3f") -> str:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return format(value, fmt)
    return "–"


def _eval_table(data: RunData) -> str:
    if not data.eval_before and not data.eval_after:
        return "<p>No evaluation reports (eval_before.json / eval_after.json).</p>"
    cols = [("accuracy", "accuracy"), ("correction_rate", "correction rate"),
            ("mean_edit_distance", "edit distance"), ("mean_normalized_edit_distance", "normalized edit"),
            ("kl", "KL(pi || pi_init)")]
    head = "".join(f"<th>{_esc(label)}</th>" for _, label in cols)
    rows = []
    modes = list(((data.eval_after or {}).get("modes") or (data.eval_before or {}).get("modes") or {}))
    for mode in modes:
        before = ((data.eval_before or {}).get("modes") or {}).get(mode) or {}
        after = ((data.eval_after or {}).get("modes") or {}).get(mode) or {}
        for label, values in (("before", before), ("after", after)):
            cells = "".join(f"<td>{_num(values.get(key))}</td>" for key, _ in cols)
            rows.append(f"<tr><th>{_esc(mode)} {label}</th>{cells}</tr>")
        delta = []
        for key, _ in cols:
            b, a = before.get(key), after.get(key)
            ok = isinstance(a, (int, float)) and isinstance(b, (int, float))
            delta.append(f"<td>{_num(a - b, '+.3f') if ok else '–'}</td>")
        rows.append(f'<tr class="delta"><th>{_esc(mode)} change</th>{"".join(delta)}</tr>')
    n = ((data.eval_after or data.eval_before or {}).get("modes") or {}).get(modes[0], {}).get("num_prompts") if modes else None
    return (f"<p>Held-out prompts per mode: {_esc(n)}.</p><table><tr><th></th>{head}</tr>"
            + "".join(rows) + "</table>")


def _summary(data: RunData) -> list[tuple[str, str]]:
    train = [r for r in data.metrics if "train/loss" in r]
    last = train[-1] if train else {}
    pairs_trained = sum(float(r.get("train/num_pairs") or 0) for r in train)
    changed = sum(not p.is_noop for p in data.pairs)
    stale = series(data.metrics, "buffer/batch_staleness_mean")[1] or series(
        data.metrics, "buffer/last_batch_staleness_mean")[1]
    syncs = series(data.metrics, "sync/seconds")[1]
    times = [r["time"] for r in data.metrics if isinstance(r.get("time"), (int, float))]
    return [
        ("run", data.name),
        ("mode", str(data.config.get("mode", "?"))),
        ("objective", f"{_config_value(data.config, 'objective.form')} "
                      f"(beta {_config_value(data.config, 'objective.beta')})"),
        ("teacher", str(_config_value(data.config, "teacher.kind"))),
        ("policy", str(_config_value(data.config, "model.path"))),
        ("learner steps", f"{last.get('step', 0)} of {data.config.get('total_steps', '?')}"),
        ("pairs trained", f"{pairs_trained:.0f}"),
        ("pairs in the correction log", f"{len(data.pairs)} ({changed} corrected, "
                                         f"{len(data.pairs) - changed} with y' = y)"),
        ("last loss / margin", f"{_num(last.get('train/loss'), '.4f')} / {_num(last.get('train/margin'))}"),
        ("mean batch staleness", _num(sum(stale) / len(stale)) if stale else "–"),
        ("mean sync seconds", _num(sum(syncs) / len(syncs), ".4f") if syncs else "–"),
        ("wall time", f"{times[-1] - times[0]:.1f} s" if len(times) > 1 else "–"),
    ]


def _token_render(tokenizer: Any | None) -> Callable[[int], str]:
    return TokenRenderer(tokenizer) if tokenizer is not None else (lambda i: f"\u27e8{i}\u27e9")


def _diff_rows(pairs: Sequence[CorrectionPair], tokenizer: Any | None) -> str:
    rows = []
    for p in pairs:
        if tokenizer is not None:
            t = pair_text(p, TokenRenderer(tokenizer))
            prompt, y, y_prime, diff = t.prompt, t.y, t.y_prime, t.diff_html
        else:
            render = _token_render(None)
            prompt, y, y_prime = (" ".join(map(str, ids)) for ids in (p.prompt_ids, p.rejected_ids, p.chosen_ids))
            diff = segments_html(diff_segments(p.rejected_ids, p.chosen_ids, render))
        rows.append(
            f"<tr><td>{_esc(p.policy_version)}</td><td><pre>{_esc(prompt)}</pre></td>"
            f"<td><pre>{_esc(y)}</pre></td><td><pre>{_esc(y_prime)}</pre></td>"
            f"<td>{_esc(p.edit_distance)}</td><td>{diff}</td></tr>"
        )
    return "".join(rows)


PAGE_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1f2328;max-width:1400px}
h1{margin-bottom:4px} h2{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0} th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
tr.delta td{font-weight:600} td pre{margin:0;white-space:pre-wrap;word-break:break-all}
figure{display:inline-block;margin:8px 16px 16px 0;max-width:100%} figure img{max-width:100%;border:1px solid #d0d7de}
figcaption{font-size:13px;color:#57606a;max-width:900px} .notes{color:#9a6700}
dl.summary{display:grid;grid-template-columns:max-content auto;gap:2px 16px} dl.summary dt{font-weight:600}
dl.summary dd{margin:0} details pre{background:#f6f8fa;padding:8px;overflow:auto}
"""


def render_page(data: RunData, plots: list[tuple[PlotSpec, Path]], tokenizer: Any | None,
                tokenizer_source: str, samples: int) -> str:
    """The report page (a string of HTML; every value from the run escaped)."""
    summary = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in _summary(data))
    figures = "".join(
        f'<figure><img alt="{_esc(spec.title)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption><b>{_esc(spec.title)}</b> '
        f"({_esc(path.name)}). {_esc(spec.caption)}</figcaption></figure>"
        for spec, path in plots
    )
    sampled = sample_pairs(data.pairs, samples)
    changed = sum(not p.is_noop for p in data.pairs)
    decoded = (f"decoded with the tokenizer at {tokenizer_source}" if tokenizer is not None
               else "no tokenizer found: token ids shown")
    notes = "".join(f"<li>{_esc(n)}</li>" for n in data.notes)
    config_text = yaml.safe_dump(data.config, sort_keys=False) if data.config else "(config.yaml not found)"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>correction-rl report: {_esc(data.name)}</title>
<style>{PAGE_CSS}</style></head>
<body>
<h1>correction-rl run report: {_esc(data.name)}</h1>
<p>From {_esc(data.run_dir)}, generated {_esc(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}.
Every metric is explained in docs/metrics.md.</p>
{f'<ul class="notes">{notes}</ul>' if notes else ''}
<h2>Summary</h2>
<dl class="summary">{summary}</dl>
<h2>Held-out evaluation, before and after training</h2>
{_eval_table(data)}
<h2>Plots</h2>
{figures}
<h2>Sample of corrections</h2>
<p>{len(sampled)} of the {changed} corrected pairs in the correction log, spread from the first
to the last ({_esc(decoded)}). In the diff, <del style="background:#ffd7d5;color:#82071e">struck
red</del> is what the teacher removed from y and <ins style="background:#ccffd8;color:#055d20;text-decoration:none">green</ins>
what it added; ␣ is a space, ↵ a newline, &lt;eos&gt; the end of the answer.</p>
<table><tr><th>policy version</th><th>prompt</th><th>y (policy)</th><th>y' (teacher)</th>
<th>edit distance</th><th>diff</th></tr>{_diff_rows(sampled, tokenizer)}</table>
<h2>Resolved config</h2>
<details><summary>config.yaml</summary><pre>{_esc(config_text)}</pre></details>
</body></html>
"""


@dataclass
class Report:
    """What ``write_report`` produced."""

    out_dir: Path
    page: Path
    plots: list[Path]
    drawn: dict[str, list[str]]
    """Plot file name -> metric keys drawn on it (empty: nothing to plot in this run)."""
    notes: list[str] = field(default_factory=list)
    """What was missing or unreadable in the run directory (also shown on the page)."""


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, samples: int = 12,
                 tokenizer_path: str | None = None) -> Report:
    """Read ``run_dir``, write the PNG plots and ``index.html`` to ``out_dir`` (default
    ``run_dir/report``)."""
    data = load_run(run_dir)
    out = Path(out_dir) if out_dir else data.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    derived = derived_series(data)
    plots, drawn = [], {}
    for spec in PLOTS:
        path = out / spec.filename
        drawn[spec.filename] = render_plot(spec, data, derived, path)
        plots.append((spec, path))
    tokenizer, source = find_tokenizer(data, tokenizer_path)
    page = out / "index.html"
    page.write_text(render_page(data, plots, tokenizer, source, samples), encoding="utf-8")
    return Report(out, page, [p for _, p in plots], drawn, list(data.notes))


def cli(argv: list[str]) -> int:
    """``correction-rl report RUN_DIR [--out DIR] [--samples N] [--tokenizer PATH]``"""
    p = argparse.ArgumentParser(
        prog="correction-rl report",
        description="Write PNG plots and an HTML summary page from a run directory (offline; "
        "no W&B needed). See docs/run_directory.md and docs/metrics.md.",
    )
    p.add_argument("run_dir", help="a run directory (holds metrics.jsonl, corrections.jsonl, config.yaml ...)")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/report)")
    p.add_argument("--samples", type=int, default=12, help="corrections shown with their diffs (default 12)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory to decode the log (default: RUN_DIR/policy, else config model.path)")
    a = p.parse_args(argv)
    report = write_report(a.run_dir, a.out, a.samples, a.tokenizer)  # errors: one line, exit 2 (cli.py)
    for note in report.notes:
        if note.startswith("metrics.jsonl:"):
            print(f"warning: {note}", file=sys.stderr)
    for path in report.plots:
        print(f"wrote {path}")
    print(f"wrote {report.page}")
    return 0
