"""What the teacher changed: the diff of y against y', as safe HTML, and the W&B corrections table.

Users watch a run to *see* corrections, not only their count, so every place that shows a pair
(the W&B table every ``metrics.table_every_steps`` steps, the report page) renders the same
diff: deleted parts of y struck through in red, inserted parts of y' in green.

Two rules shape this module:

* **The alignment is the one the metric counts.** The segments come from rapidfuzz's Levenshtein
  opcodes, the same distance ``edits.edit_distance`` reports, so the highlighted tokens are
  exactly the edits behind ``edit_distance`` (difflib's matcher is not minimal and could
  disagree with the number next to it). Pairs are diffed on token ids (what the learner sees,
  ``<eos>`` included: a response cut at the length limit shows the missing ``<eos>`` as an
  insertion); free text is diffed per character.
* **Prompt and response text is data, never markup.** Model output can contain anything,
  ``<script>`` included; every piece of it goes through ``html.escape`` (quotes too) before it
  is put between our own tags, and no attribute value is ever built from it.

``wandb`` is imported only inside ``corrections_table`` (W&B's ``Html`` cell type) when asked
for W&B cells, so the rest of the module is usable without it.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Sequence

from rapidfuzz.distance import Levenshtein

from correction_rl.types import CorrectionPair

if TYPE_CHECKING:
    from correction_rl.config import RunConfig
    from correction_rl.observe.metrics import MetricSink

Op = Literal["equal", "delete", "insert"]

DEL_STYLE = "background:#ffd7d5;color:#82071e;text-decoration:line-through"
INS_STYLE = "background:#ccffd8;color:#055d20;text-decoration:none"
BOX_STYLE = "font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-all"

TABLE_KEY = "teacher/corrections"
"""The W&B key the corrections table is logged under."""
TABLE_COLUMNS = ["prompt", "y", "y'", "edit_distance", "diff", "policy_version", "teacher", "pair_id"]


@dataclass(frozen=True)
class DiffSegment:
    """A run of text that both sides share (``equal``), only y has (``delete``) or only y' has
    (``insert``)."""

    op: Op
    text: str


def diff_segments(
    a: Sequence[Any], b: Sequence[Any], render: Callable[[Any], str] = str
) -> list[DiffSegment]:
    """Minimal-edit alignment of ``a`` (y) against ``b`` (y') as segments.

    ``a`` and ``b`` are strings (per-character diff) or token-id lists (``render`` turns one
    element into its text). A substitution becomes a deletion followed by an insertion; adjacent
    segments of the same kind are merged.
    """
    out: list[DiffSegment] = []

    def add(op: Op, items: Sequence[Any]) -> None:
        text = "".join(render(x) for x in items)
        if not items:
            return
        if out and out[-1].op == op:
            out[-1] = DiffSegment(op, out[-1].text + text)
        else:
            out.append(DiffSegment(op, text))

    for block in Levenshtein.opcodes(a, b):
        if block.tag == "equal":
            add("equal", a[block.src_start : block.src_end])
            continue
        if block.tag in ("delete", "replace"):
            add("delete", a[block.src_start : block.src_end])
        if block.tag in ("insert", "replace"):
            add("insert", b[block.dest_start : block.dest_end])
    return out


def _visible(text: str) -> str:
    """Whitespace inside a changed segment made visible (an inserted space would otherwise show
    as an empty green box, an inserted newline as nothing)."""
    return text.replace(" ", "\u2423").replace("\n", "\u21b5\n")


def segments_html(segments: Iterable[DiffSegment]) -> str:
    """The segments as one ``<div>`` of inline-styled spans (inline styles: W&B shows HTML cells
    in an iframe without our stylesheet). Every text is escaped."""
    parts = []
    for seg in segments:
        if seg.op == "equal":
            parts.append(html.escape(seg.text, quote=True))
        elif seg.op == "delete":
            parts.append(f'<del style="{DEL_STYLE}">{html.escape(_visible(seg.text), quote=True)}</del>')
        else:
            parts.append(f'<ins style="{INS_STYLE}">{html.escape(_visible(seg.text), quote=True)}</ins>')
    return f'<div class="crl-diff" style="{BOX_STYLE}">{"".join(parts)}</div>'


def diff_html(y: str, y_prime: str) -> str:
    """Per-character diff of two texts as safe HTML."""
    return segments_html(diff_segments(y, y_prime))


class TokenRenderer:
    """Decodes one token id at a time (cached), special tokens included, so a token diff can show
    ``<eos>``; a tokenizer whose single tokens are partial characters (byte-level BPE) shows
    them as the replacement character."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text


def token_diff_html(y_ids: Sequence[int], y_prime_ids: Sequence[int], tokenizer: Any) -> str:
    """Token-level diff (the alignment ``CorrectionPair.edit_distance`` counts) as safe HTML."""
    render = tokenizer if isinstance(tokenizer, TokenRenderer) else TokenRenderer(tokenizer)
    return segments_html(diff_segments(list(y_ids), list(y_prime_ids), render))


@dataclass(frozen=True)
class PairText:
    """A pair decoded for people: prompt, y and y' without special tokens, plus the token diff."""

    prompt: str
    y: str
    y_prime: str
    diff_html: str


def pair_text(pair: CorrectionPair, tokenizer: Any) -> PairText:
    render = tokenizer if isinstance(tokenizer, TokenRenderer) else TokenRenderer(tokenizer)
    tok = render.tokenizer
    return PairText(
        prompt=tok.decode(pair.prompt_ids, skip_special_tokens=True),
        y=tok.decode(pair.rejected_ids, skip_special_tokens=True),
        y_prime=tok.decode(pair.chosen_ids, skip_special_tokens=True),
        diff_html=token_diff_html(pair.rejected_ids, pair.chosen_ids, render),
    )


def select_pairs(pairs: Sequence[CorrectionPair], max_rows: int) -> list[CorrectionPair]:
    """Up to ``max_rows`` pairs, corrected ones (y' != y) first, each group in its given order:
    a table full of unchanged answers shows nothing."""
    changed = [p for p in pairs if not p.is_noop]
    same = [p for p in pairs if p.is_noop]
    return (changed + same)[: max(0, max_rows)]


def corrections_table(
    pairs: Sequence[CorrectionPair], tokenizer: Any, max_rows: int, *, as_wandb: bool = True
) -> tuple[list[str], list[list[Any]]]:
    """``(columns, rows)`` for a table of sampled corrections: prompt, y, y', token edit distance,
    the HTML diff (a ``wandb.Html`` cell, or the HTML string with ``as_wandb=False``), the policy
    version that produced y, the teacher and the pair id."""
    html_cell: Callable[[str], Any] = str
    if as_wandb:
        import wandb  # lazy: only W&B tables need it

        def html_cell(markup: str) -> Any:
            return wandb.Html(markup, inject=False, data_is_not_path=True)

    render = TokenRenderer(tokenizer)
    rows = []
    for pair in select_pairs(pairs, max_rows):
        text = pair_text(pair, render)
        rows.append([text.prompt, text.y, text.y_prime, int(pair.edit_distance), html_cell(text.diff_html),
                     int(pair.policy_version), pair.teacher, pair.pair_id])
    return list(TABLE_COLUMNS), rows


def table_sinks(sink: Any) -> list[Any]:
    """The sinks under ``sink`` (a ``MultiSink`` is searched) that can log tables."""
    if hasattr(sink, "log_table"):
        return [sink]
    return [t for child in getattr(sink, "sinks", ()) for t in table_sinks(child)]


@lru_cache(maxsize=4)
def _load_tokenizer(path: str) -> Any:
    from correction_rl.models import load_tokenizer

    return load_tokenizer(path)


def maybe_log_corrections(
    sink: "MetricSink", pairs: Sequence[CorrectionPair], tokenizer: Any, step: int, cfg: "RunConfig"
) -> bool:
    """Log a table of corrections from ``pairs`` (the batch the learner just trained on) every
    ``metrics.table_every_steps`` steps to the sinks that take tables (W&B). ``tokenizer=None``
    loads the policy's tokenizer from ``model.path`` (once). Returns whether a table was logged."""
    every = cfg.metrics.table_every_steps
    if every <= 0 or step % every or not pairs:
        return False
    targets = table_sinks(sink)
    if not targets:
        return False
    if tokenizer is None:
        tokenizer = _load_tokenizer(str(cfg.model.path))
    columns, rows = corrections_table(pairs, tokenizer, cfg.metrics.table_rows)
    for target in targets:
        target.log_table(TABLE_KEY, columns, rows, step)
    return True
