"""Score predictions against references with Korean ROUGE; print the scores as one JSON line.

Predictions: a submission (`fname,summary`, as loop.predict writes it) or a run's own predictions/step_N.csv
(`fname,prediction,reference,rouge_l`). References: a data file (`fname,...,summary`, e.g. dev.csv) or a
predictions/step_N.csv (its `reference` column). Without --references the predictions file's own `reference`
column is the reference. Rows are joined on fname: a missing, extra or duplicate fname, an empty reference, or
a file with both candidate columns is an error (exit 2); empty predictions score 0, with a warning.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from loop.data import read_text
from loop.errors import ArgumentParser, UserError, run_cli
from loop.rouge import TOKENIZERS, compute_rouge

REQUIRED_COLUMNS = ("fname", "summary")
# The column that holds the text, in the files each side accepts.
PREDICTION_COLUMNS = ("summary", "prediction")
REFERENCE_COLUMNS = ("summary", "reference")
_SHOW_MISSING = 5


@dataclass
class Table:
    """One CSV's fname column and one text column, with the line each row started on."""

    path: Path
    column: str
    values: dict[str, str]  # fname -> text
    lines: dict[str, int]  # fname -> line of its row


def _expected(choices: tuple[str, ...]) -> str:
    return "expected a UTF-8 CSV with columns fname," + " or fname,".join(choices)


def read_table(path: str | Path, choices: tuple[str, ...] = ("summary",)) -> Table:
    """Read `fname` and the one column of `choices` the CSV has; errors name the file and line."""
    path = Path(path)
    expected = _expected(choices)
    text = read_text(path, expected)
    if "\0" in text:  # a binary or UTF-16 file decodes as UTF-8 here only with NUL bytes in it
        line = text[: text.index("\0")].count("\n") + 1
        raise UserError(f"{path}: line {line}: NUL byte; not a text CSV ({expected})")

    # newline="" keeps CR/LF inside quoted fields intact, as the csv module requires; strict turns an
    # unterminated quote into an error instead of one field that runs to the end of the file.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise UserError(f"{path}: file is empty ({expected})")
        columns = [name.strip() for name in header]
        present = [name for name in choices if name in columns]
        missing = ([] if "fname" in columns else ["fname"]) + ([] if present else [" or ".join(choices)])
        if missing:
            raise UserError(
                f"{path}: missing column(s) {', '.join(missing)} in header {','.join(columns)!r} ({expected})"
            )
        if len(present) > 1:
            raise UserError(f"{path}: has both {' and '.join(present)} columns; it is not clear which one to "
                            f"score ({expected})")
        column = present[0]
        for name in ("fname", column):
            if columns.count(name) > 1:
                raise UserError(f"{path}: column {name} appears {columns.count(name)} times in the header")
        fname_col, value_col = columns.index("fname"), columns.index(column)
        values: dict[str, str] = {}
        lines: dict[str, int] = {}
        line = reader.line_num + 1
        for row in reader:
            if row:  # blank lines carry no record
                if len(row) <= max(fname_col, value_col):
                    raise UserError(
                        f"{path}: line {line}: expected {len(columns)} fields, found {len(row)} ({expected})"
                    )
                fname = row[fname_col].strip()
                if not fname:
                    raise UserError(f"{path}: line {line}: empty fname")
                if fname in values:
                    raise UserError(
                        f"{path}: line {line}: duplicate fname {fname!r} (first on line {lines[fname]})"
                    )
                values[fname] = row[value_col]
                lines[fname] = line
            line = reader.line_num + 1
    except csv.Error as err:
        raise UserError(f"{path}: line {reader.line_num}: malformed CSV: {err}") from None
    if not values:
        raise UserError(f"{path}: no data rows after the header ({expected})")
    return Table(path, column, values, lines)


def read_summaries(path: str | Path) -> dict[str, str]:
    """Read a UTF-8 CSV with columns `fname,summary` (extra columns ignored) into {fname: summary}."""
    return read_table(path, REQUIRED_COLUMNS[1:]).values


def _missing_message(names: list[str], present_in: Path, absent_from: Path) -> str:
    shown = ", ".join(repr(name) for name in names[:_SHOW_MISSING])
    more = f", ... ({len(names) - _SHOW_MISSING} more)" if len(names) > _SHOW_MISSING else ""
    return f"{len(names)} fname(s) in {present_in} missing from {absent_from}: {shown}{more}"


def _same_text(a: str, b: str) -> bool:
    return a.split() == b.split()


def load_pair(predictions_path: Path, references_path: Path | None) -> tuple[Table, Table, list[str]]:
    """The predictions and references tables, checked against each other, and warnings to show."""
    predictions = read_table(predictions_path, PREDICTION_COLUMNS)
    if references_path is None:
        try:
            references = read_table(predictions_path, ("reference",))
        except UserError:
            raise UserError(f"{predictions_path}: no reference column, so --references is needed (a CSV with "
                            "fname,summary such as dev.csv)") from None
    else:
        references = read_table(references_path, REFERENCE_COLUMNS)
        same_file = predictions_path.resolve() == references_path.resolve()
        if same_file and predictions.column == references.column:
            raise UserError(f"--predictions and --references are the same file ({predictions_path}) and column "
                            f"{predictions.column}: it would score itself")
    problems = []
    no_reference = [name for name in predictions.values if name not in references.values]
    if no_reference:
        problems.append(_missing_message(no_reference, predictions.path, references.path))
    no_prediction = [name for name in references.values if name not in predictions.values]
    if no_prediction:
        problems.append(_missing_message(no_prediction, references.path, predictions.path))
    if problems:
        raise UserError("; ".join(problems))
    empty_refs = [name for name, text in references.values.items() if not text.strip()]
    if empty_refs:
        first = min(empty_refs, key=references.lines.__getitem__)
        raise UserError(f"{references.path}: line {references.lines[first]}: empty {references.column} for fname "
                        f"{first!r} ({len(empty_refs)} empty in all); every reference needs text")
    warnings = []
    if empty := sum(not text.strip() for text in predictions.values.values()):
        warnings.append(f"{empty} of {len(predictions.values)} predictions in {predictions.path} are empty; "
                        "they score 0")
    if references_path is not None and predictions.path != references.path:
        try:
            own = read_table(predictions_path, ("reference",)).values
        except UserError:
            own = {}
        differ = sum(not _same_text(own[name], references.values[name]) for name in own)
        if differ:
            warnings.append(f"{differ} of {len(own)} rows of {predictions.path} carry a reference that differs "
                            f"from {references.path} (predictions made on another dev file?)")
    return predictions, references, warnings


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, join the two files on fname, and print ROUGE F1 as one JSON line."""
    parser = ArgumentParser(prog="python -m loop.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", required=True, type=Path,
                        help="CSV with fname,summary (a submission) or fname,prediction (predictions/step_N.csv)")
    parser.add_argument("--references", type=Path,
                        help="CSV with fname,summary (e.g. dev.csv) or fname,reference; default: the "
                             "predictions file's own reference column")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="mecab", help="ROUGE token unit")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    args = parser.parse_args(argv)

    predictions, references, warnings = load_pair(args.predictions, args.references)
    fnames = list(references.values)
    result = compute_rouge([predictions.values[f] for f in fnames], [references.values[f] for f in fnames],
                           args.tokenizer)
    scores = {
        key: round(value, 6) if isinstance(value, float) else value for key, value in result.as_dict().items()
    }
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(json.dumps(scores, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
