"""Score predictions against data/test.json: per-field and overall precision / recall / F1, JSON-valid rate,
exact-match rate and the share of extracted list items that occur in the dialogue (grounded rate).

    python evaluate.py --gold data/test.json --pred predictions.jsonl --report report.json
    python evaluate.py --gold data/test.json --pred predictions.jsonl predictions_base.jsonl predictions_openai.jsonl
    python evaluate.py --gold data/test.json --pred predictions.jsonl predictions_base.jsonl --html report.html

`--html` writes one self-contained page to look at the errors: the summary, then each dialogue (worst first) with
its list items marked in the text as hit, extra or missed, and its text fields beside the gold ones, per character.

`--pred` is what predict.py, test_qwen.py or test_openai.py wrote: JSON Lines with the raw model text in "output"
and, usually, "id" (the 0-based line of the gold record). Both the gold and the predicted outputs are read with
`utils.parse_output`, so either fence style, chatter around the JSON and single quotes are all accepted; an output
with no JSON object counts as all-empty fields.

List fields (药品名称, 药物类别, 医疗检查, 医疗操作) compare sets of whitespace-stripped items; text fields (现病史,
辅助检查, 诊断结果, 医疗建议) compare characters through the longest common subsequence, whitespace removed. Counts
are pooled over all samples before dividing (micro averages); "macro avg" ("overall" in the JSON report) averages
each of precision, recall and F1 over the 8 fields, so its F1 is not the F1 of its precision and recall; "list
micro" pools the items of the 4 list fields, every extracted span counting alike. With `--json` only the report is
printed, as JSON.

Predictions made with a schema of your own (predict.py on a model trained with `--schema`) are scored on its fields,
which predict.py records beside them (`<pred>.settings.json`); `--schema` names the file for predictions made
elsewhere.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from medextract.cli import add_schema_argument
from medextract.metrics import format_comparison, format_table, load_gold, load_predictions, score
from medextract.report import build_html
from medextract.schema import results_schema
from utils import HelpFormatter, atomic_write_text, check_output_path, fail

PROG = "evaluate.py"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    io = parser.add_argument_group("input")
    io.add_argument("--gold", type=str, default="data/test.json",
                    help="data_helper's JSON Lines ({instruction, input, output}): the dialogues and gold answers")
    io.add_argument("--pred", type=str, nargs="+", default=["predictions.jsonl"],
                    help="predictions as JSON Lines with 'output' (the raw model text) and usually 'id'; several "
                         "files (e.g. fine-tuned, untuned, API) are scored side by side")
    add_schema_argument(io, help="the schema file whose fields are scored, for predictions made elsewhere; by "
                                 "default the schema the predictions' .settings.json records, else the chapter's "
                                 "eight fields")
    out = parser.add_argument_group("output")
    out.add_argument("--report", type=str, default=None,
                     help="also write the report as JSON to this file (atomically); by default nothing is written")
    out.add_argument("--html", type=str, default=None,
                     help="also write the report as one self-contained HTML page to this file: each dialogue with its "
                          "items marked hit / extra / missed, worst first; by default nothing is written")
    out.add_argument("--json", action="store_true", help="print only the report, as JSON, instead of the table")
    args = parser.parse_args(argv)
    for flag, path in (("--gold", args.gold), *(("--pred", p) for p in args.pred)):
        if not os.path.isfile(path):
            parser.error(f"{flag} {path}: no such file")
    if len(set(map(os.path.realpath, args.pred))) < len(args.pred):
        parser.error("--pred names the same file twice")
    for flag, path in (("--report", args.report), ("--html", args.html)):
        if path is None:
            continue
        if os.path.realpath(path) in map(os.path.realpath, (args.gold, *args.pred)):
            parser.error(f"{flag} {path} is one of the input files; it would be overwritten")
        try:
            check_output_path(path, flag)
        except ValueError as e:
            parser.error(str(e))
    if args.report and args.html and os.path.realpath(args.report) == os.path.realpath(args.html):
        parser.error("--report and --html name the same file")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        schema = results_schema(args.pred, args.schema)
        gold_ids, golds = load_gold(args.gold)
        predictions = {path: load_predictions(path) for path in args.pred}
        reports = {path: score(golds, preds, gold_ids=gold_ids, gold_name=args.gold, pred_name=path, schema=schema)
                   for path, preds in predictions.items()}
    except ValueError as e:  # medextract's InputError or ConfigError, or a bad line iter_jsonl names
        fail(PROG, e)
    # one file: its report; several: {file: report}
    report = reports[args.pred[0]] if len(reports) == 1 else reports
    text = json.dumps(report, ensure_ascii=False, indent=2)
    if args.report:
        try:
            atomic_write_text(args.report, text + "\n")
        except OSError as e:  # checked up front, so rare: a full disk, or a folder made read-only since
            fail(PROG, f"--report {args.report}: cannot write it ({e.strerror})")
    if args.html:
        try:
            atomic_write_text(args.html, build_html(golds, gold_ids, predictions, reports, args.gold, schema))
        except OSError as e:
            fail(PROG, f"--html {args.html}: cannot write it ({e.strerror})")
    if args.json:
        print(text, flush=True)
    else:
        print(format_table(report) if len(reports) == 1 else format_comparison(reports), flush=True)
        if args.html:
            print(f"report page: {args.html} (open it in a browser)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
