"""The evaluation report as one self-contained HTML page (evaluate.py --html): the summary table, then every dialogue
with its list items marked in the text and listed per field as hit (predicted and gold), extra (predicted, not
gold) or missed (gold, not predicted), and its text fields, gold beside predicted, with the characters outside their
longest common subsequence (the one the metric counts) marked. Several prediction files give one column each.
Dialogues come worst first (by the first file's macro F1); a button orders them by id. Nothing is fetched: the CSS
and the few lines of JavaScript are in the page.

Item elements carry `data-field` and `data-verdict` (hit, extra, missed), so a reader (or a test) can count them;
each mark in a dialogue carries `data-start` / `data-end`, its offsets in the dialogue.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Sequence

from utils import parse_output

from .metrics import align, item_set, lcs_alignment, score, squash
from .schema import CHAPTER_SCHEMA, Schema

VERDICTS = ("hit", "extra", "missed")
MAX_DIFF_CELLS = 4_000_000  # above this gold x predicted length a text field is shown without per-character marks


@dataclass
class Column:
    """One prediction file's answer to one dialogue."""
    fields: dict
    valid: bool
    truncated: bool
    f1: float


def build_html(golds: Sequence[dict], gold_ids: Sequence[int], predictions: dict[str, Sequence[dict]],
               reports: dict[str, dict], gold_name: str, schema: Schema = CHAPTER_SCHEMA) -> str:
    """The page for gold records and, per prediction file (in order), its records and its report, field by field of
    `schema`."""
    names = list(predictions)
    columns: list[list[Column | None]] = [[None] * len(names) for _ in golds]
    for k, name in enumerate(names):
        preds = predictions[name]
        for i, j in align(golds, preds, gold_ids, gold_name, name):
            fields, valid = parse_output(preds[j]["output"], schema.fields)
            f1 = score([golds[i]], [{"output": preds[j]["output"]}], schema=schema)["overall"]["f1"]
            columns[i][k] = Column(fields, valid, bool(preds[j].get("truncated")), f1)
    order = sorted(range(len(golds)), key=lambda i: (columns[i][0].f1, gold_ids[i]))
    body = [_summary(reports, names, gold_name, len(golds), schema),
            LEGEND,
            '<p id="order">Order: <button type="button" data-order="f1">worst first</button> '
            '<button type="button" data-order="id">by id</button></p>',
            '<section id="dialogues">']
    for i in order:
        gold_fields, _ = parse_output(golds[i]["output"], schema.fields)
        body.append(_dialogue(gold_ids[i], golds[i]["input"], gold_fields, columns[i], names, schema))
    body.append("</section>")
    return PAGE.format(title=html.escape(f"Extraction report: {', '.join(names)}"), body="\n".join(body))


def _summary(reports: dict[str, dict], names: list[str], gold_name: str, n: int, schema: Schema) -> str:
    head = "".join(f'<th colspan="3" title="{html.escape(name)}">[{k + 1}]</th>' for k, name in enumerate(names))
    sub = "<th>P</th><th>R</th><th>F1</th>" * len(names)
    rows = []
    keys = [(html.escape(key), lambda r, key=key: r["fields"][key]) for key in schema.keys]
    keys += [("macro avg", lambda r: r["overall"]), ("list micro", lambda r: r["list_fields_micro"])]
    for label, pick in keys:
        cells = "".join(f"<td>{pick(reports[name])[m]:.4f}</td>" for name in names
                        for m in ("precision", "recall", "f1"))
        rows.append(f'<tr class="{"total" if label in ("macro avg", "list micro") else ""}"><th>{label}</th>'
                    f"{cells}</tr>")
    for label, pick in (("JSON valid", lambda r: f"{r['json_valid_rate']:.4f}"),
                        ("grounded", lambda r: "n/a" if r["grounded_rate"] is None else f"{r['grounded_rate']:.4f}"),
                        ("exact match", lambda r: f"{r['exact_match']:.4f}"),
                        ("truncated", lambda r: str(r["truncated"]))):
        cells = "".join(f'<td colspan="3">{pick(reports[name])}</td>' for name in names)
        rows.append(f'<tr class="rate"><th>{label}</th>{cells}</tr>')
    files = "".join(f"<li>[{k + 1}] {html.escape(name)} ({reports[name]['n']} answers)</li>"
                    for k, name in enumerate(names))
    return (f"<h1>Extraction report</h1><p>{n} dialogues of {html.escape(gold_name)}</p><ol class=\"files\">{files}"
            f'</ol><table id="summary"><thead><tr><th rowspan="2">field</th>{head}</tr><tr>{sub}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _dialogue(gold_id: int, dialogue: str, gold: dict, columns: list[Column | None], names: list[str],
              schema: Schema) -> str:
    f1s = " · ".join(f"[{k + 1}] F1 {c.f1:.2f}" for k, c in enumerate(columns) if c is not None)
    parts = [f'<article class="dialogue" data-id="{gold_id}" data-f1="{columns[0].f1:.6f}">',
             f"<h2>id {gold_id} <small>{f1s}</small></h2>", '<div class="columns">']
    for k, column in enumerate(columns):
        parts.append(_column(k, names[k], dialogue, gold, column, schema))
    parts.append("</div></article>")
    return "\n".join(parts)


def _column(k: int, name: str, dialogue: str, gold: dict, column: Column, schema: Schema) -> str:
    flags = ("valid JSON" if column.valid else "not valid JSON") + (" · cut at the budget" if column.truncated else "")
    verdicts = {key: verdict_items(column.fields[key], gold[key]) for key in schema.span_keys}
    rows = []
    for key, kind in schema.fields:  # in the schema's order
        shown = html.escape(key)
        if kind == "spans":
            items = "".join(f'<span class="item {v}" data-field="{shown}" data-verdict="{v}">{html.escape(text)}'
                            f'</span>' for v in VERDICTS for text in verdicts[key][v])
            rows.append(f'<tr data-field="{shown}"><th>{shown}</th><td>{items or "<i>none</i>"}</td></tr>')
            continue
        gold_html, pred_html = text_diff(squash(gold[key]), squash(column.fields[key]))
        rows.append(f'<tr data-field="{shown}"><th>{shown}</th><td><div class="pair"><div class="gold" '
                    f'title="gold">{gold_html or "<i>empty</i>"}</div><div class="pred" title="predicted">'
                    f'{pred_html or "<i>empty</i>"}</div></div></td></tr>')
    return (f'<div class="column" data-file="{k}"><h3>[{k + 1}] {html.escape(name)} <small>F1 {column.f1:.2f} · '
            f'{flags}</small></h3><pre class="text">{marked_dialogue(dialogue, verdicts)}</pre>'
            f'<table class="fields">{"".join(rows)}</table></div>')


def verdict_items(predicted: Sequence[str], gold: Sequence[str]) -> dict[str, list[str]]:
    """A list field's items by verdict, as the metric counts them (whitespace-stripped sets), each list sorted."""
    p, g = item_set(predicted), item_set(gold)
    return {"hit": sorted(p & g), "extra": sorted(p - g), "missed": sorted(g - p)}


def marked_dialogue(dialogue: str, verdicts: dict[str, dict[str, list[str]]]) -> str:
    """The dialogue, escaped, with each item's first occurrence wrapped in a <mark> of its verdict; where two would
    overlap, the earlier (then the longer) keeps its mark."""
    found = []
    for key, by_verdict in verdicts.items():
        for verdict, items in by_verdict.items():
            for text in items:
                start = dialogue.find(text)
                if start >= 0:
                    found.append((start, -len(text), key, verdict))
    out, at = [], 0
    for start, negative, key, verdict in sorted(found):
        end = start - negative
        if start < at:
            continue
        out.append(html.escape(dialogue[at:start]))
        out.append(f'<mark class="{verdict}" data-field="{html.escape(key)}" data-mark="{verdict}" '
                   f'data-start="{start}" data-end="{end}">{html.escape(dialogue[start:end])}</mark>')
        at = end
    out.append(html.escape(dialogue[at:]))
    return "".join(out)


def text_diff(gold: str, predicted: str) -> tuple[str, str]:
    """Both texts, escaped, with the characters outside their longest common subsequence marked: <del> in the gold
    text (missed), <ins> in the predicted one (extra)."""
    if len(gold) * len(predicted) > MAX_DIFF_CELLS:
        return html.escape(gold), html.escape(predicted)
    in_gold, in_pred = lcs_alignment(gold, predicted)
    return _marked(gold, in_gold, "del"), _marked(predicted, in_pred, "ins")


def _marked(text: str, kept: list[bool], tag: str) -> str:
    out, run, run_kept = [], [], True
    for ch, keep in zip(text, kept):
        if keep != run_kept and run:
            out.append(html.escape("".join(run)) if run_kept else f"<{tag}>{html.escape(''.join(run))}</{tag}>")
            run = []
        run_kept = keep
        run.append(ch)
    if run:
        out.append(html.escape("".join(run)) if run_kept else f"<{tag}>{html.escape(''.join(run))}</{tag}>")
    return "".join(out)


LEGEND = ('<p class="legend"><span class="item hit">hit: predicted and gold</span>'
          '<span class="item extra">extra: predicted, not gold</span>'
          '<span class="item missed">missed: gold, not predicted</span> '
          'Text fields: <del>gold characters the answer missed</del> <ins>characters the answer added</ins></p>')

PAGE = """<!doctype html>
<html lang="zh">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, "Noto Sans CJK SC", "PingFang SC", sans-serif; margin: 1.5rem; color: #222; }}
table {{ border-collapse: collapse; }}
#summary th, #summary td {{ border: 1px solid #ccc; padding: .2rem .5rem; text-align: right; }}
#summary tbody th {{ text-align: left; }}
#summary tr.total, #summary tr.rate {{ background: #f4f4f4; }}
.dialogue {{ border-top: 2px solid #999; margin-top: 1.5rem; }}
.columns {{ display: flex; gap: 1rem; align-items: flex-start; }}
.column {{ flex: 1; min-width: 0; }}
pre.text {{ white-space: pre-wrap; background: #fafafa; padding: .5rem; border: 1px solid #eee; }}
mark {{ padding: 0 1px; border-radius: 2px; }}
mark.hit, .item.hit {{ background: #c8efc8; }}
mark.extra, .item.extra {{ background: #ffd0d0; }}
mark.missed, .item.missed {{ background: #ffe9a8; }}
.item {{ display: inline-block; margin: 1px 3px 1px 0; padding: 0 4px; border-radius: 3px; }}
.item.extra {{ text-decoration: line-through; }}
.fields th {{ text-align: left; vertical-align: top; padding-right: .6rem; white-space: nowrap; }}
.fields td {{ padding: .15rem 0; }}
.pair {{ display: grid; grid-template-columns: 1fr 1fr; gap: .5rem; }}
.pair .gold::before {{ content: "gold: "; color: #888; }}
.pair .pred::before {{ content: "pred: "; color: #888; }}
del {{ background: #ffe9a8; text-decoration: none; }}
ins {{ background: #ffd0d0; text-decoration: none; }}
.legend span {{ margin-right: 1rem; }}
</style>
</head>
<body>
{body}
<script>
for (const button of document.querySelectorAll('#order button')) {{
  button.addEventListener('click', () => {{
    const list = document.getElementById('dialogues');
    const key = button.dataset.order;
    const items = [...list.children].sort((a, b) => key === 'id'
      ? Number(a.dataset.id) - Number(b.dataset.id)
      : Number(a.dataset.f1) - Number(b.dataset.f1) || Number(a.dataset.id) - Number(b.dataset.id));
    for (const item of items) list.appendChild(item);
  }});
}}
</script>
</body>
</html>
"""
