"""Score predictions against references with Korean ROUGE; print the scores as one JSON line.

Predictions: a submission (`fname,summary`, as loop.predict writes it) or a run's own predictions/step_N.csv
(`fname,prediction,reference,rouge_l`). References: a data file (`fname,...,summary`, e.g. dev.csv) or a
predictions/step_N.csv (its `reference` column); several references per row as `summary1,summary2,...` (or
`reference1,...`), found on their own, or named with --reference-columns. Without --references the predictions
file's own reference column(s) are the references. Per row, each ROUGE type's F1 is combined over the references
by --aggregate (mean or max); rouge_mean is the mean of ROUGE-1/2/L, rouge_mean_x100 as a leaderboard shows it.
Rows are joined on fname: a missing, extra or duplicate fname, a row whose references are all empty, or a file
with both candidate columns is an error (exit 2); an empty reference among others is left out, and empty
predictions score 0, each with a warning.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from loop.data import read_text
from loop.errors import ArgumentParser, UserError, run_cli
from loop.rouge import AGGREGATES, TOKENIZERS, compute_rouge

REQUIRED_COLUMNS = ("fname", "summary")
# The column that holds the text, in the files each side accepts.
PREDICTION_COLUMNS = ("summary", "prediction")
REFERENCE_COLUMNS = ("summary", "reference")
_SHOW_MISSING = 5


@dataclass
class Table:
    """One CSV's fname column and its text column(s), with the line each row started on."""

    path: Path
    columns: tuple[str, ...]
    values: dict[str, list[str]]  # fname -> one text per column
    lines: dict[str, int]  # fname -> line of its row

    @property
    def column(self) -> str:
        """The text columns as one name for messages: `summary`, or `summary1, summary2`."""
        return ", ".join(self.columns)


def _expected(choices: tuple[str, ...], numbered: bool = False) -> str:
    several = f"; several references as {choices[0]}1,{choices[0]}2,..." if numbered else ""
    return "expected a UTF-8 CSV with columns fname," + " or fname,".join(choices) + several


def _numbered(base: str, names: list[str]) -> list[str]:
    """The columns `base1`, `base2`, ... of a header, in the order of their numbers."""
    found = [name for name in names if re.fullmatch(rf"{re.escape(base)}[0-9]+", name)]
    return sorted(found, key=lambda name: int(name[len(base):]))


def _pick(path: Path, names: list[str], choices: tuple[str, ...], numbered: bool, expected: str) -> tuple[str, ...]:
    """The text column(s) a header offers: exactly one of `choices`, or (numbered) one set of `choice1..N`."""
    groups = [[name] for name in choices if name in names]
    if numbered:
        groups += [found for name in choices if (found := _numbered(name, names))]
    missing = ([] if "fname" in names else ["fname"]) + ([] if groups else [" or ".join(choices)])
    if missing:
        raise UserError(
            f"{path}: missing column(s) {', '.join(missing)} in header {','.join(names)!r} ({expected})"
        )
    if len(groups) > 1:
        shown = " and ".join(", ".join(group) for group in groups)
        more = "; name the reference columns with --reference-columns" if numbered else ""
        raise UserError(f"{path}: has both {shown} columns; it is not clear which one to score{more} ({expected})")
    return tuple(groups[0])


def read_table(path: str | Path, choices: tuple[str, ...] = ("summary",), numbered: bool = False,
               columns: tuple[str, ...] | None = None) -> Table:
    """Read `fname` and the text column(s) of a CSV; errors name the file and line.

    The text columns are `columns` when given, else the one of `choices` the file has, or (with `numbered`) the
    `choice1`, `choice2`, ... it has.
    """
    path = Path(path)
    expected = _expected(columns or choices, numbered and columns is None)
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
        names = [name.strip() for name in header]
        if columns is None:
            picked = _pick(path, names, choices, numbered, expected)
        else:
            absent = [name for name in ("fname", *columns) if name not in names]
            if absent:
                raise UserError(f"{path}: missing column(s) {', '.join(absent)} in header {','.join(names)!r} "
                                f"({expected})")
            picked = columns
        for name in ("fname", *picked):
            if names.count(name) > 1:
                raise UserError(f"{path}: column {name} appears {names.count(name)} times in the header")
        fname_col, value_cols = names.index("fname"), [names.index(name) for name in picked]
        values: dict[str, list[str]] = {}
        lines: dict[str, int] = {}
        line = reader.line_num + 1
        for row in reader:
            if row:  # blank lines carry no record
                if len(row) <= max(fname_col, *value_cols):
                    raise UserError(
                        f"{path}: line {line}: expected {len(names)} fields, found {len(row)} ({expected})"
                    )
                fname = row[fname_col].strip()
                if not fname:
                    raise UserError(f"{path}: line {line}: empty fname")
                if fname in values:
                    raise UserError(
                        f"{path}: line {line}: duplicate fname {fname!r} (first on line {lines[fname]})"
                    )
                values[fname] = [row[col] for col in value_cols]
                lines[fname] = line
            line = reader.line_num + 1
    except csv.Error as err:
        raise UserError(f"{path}: line {reader.line_num}: malformed CSV: {err}") from None
    if not values:
        raise UserError(f"{path}: no data rows after the header ({expected})")
    return Table(path, tuple(picked), values, lines)


def read_summaries(path: str | Path) -> dict[str, str]:
    """Read a UTF-8 CSV with columns `fname,summary` (extra columns ignored) into {fname: summary}."""
    return {fname: texts[0] for fname, texts in read_table(path, REQUIRED_COLUMNS[1:]).values.items()}


def _missing_message(names: list[str], present_in: Path, absent_from: Path) -> str:
    shown = ", ".join(repr(name) for name in names[:_SHOW_MISSING])
    more = f", ... ({len(names) - _SHOW_MISSING} more)" if len(names) > _SHOW_MISSING else ""
    return f"{len(names)} fname(s) in {present_in} missing from {absent_from}: {shown}{more}"


def _same_texts(a: list[str], b: list[str]) -> bool:
    return len(a) == len(b) and all(x.split() == y.split() for x, y in zip(a, b, strict=True))


def _read_references(predictions: Table, references_path: Path | None,
                     columns: tuple[str, ...] | None) -> Table:
    """The references: --references (or the predictions file itself) with the named or detected columns."""
    if references_path is not None:
        return read_table(references_path, REFERENCE_COLUMNS, numbered=True, columns=columns)
    if columns is not None:
        return read_table(predictions.path, columns=columns)
    try:
        return read_table(predictions.path, ("reference",), numbered=True)
    except UserError:
        raise UserError(f"{predictions.path}: no reference column, so --references is needed (a CSV with "
                        "fname,summary such as dev.csv)") from None


def load_pair(predictions_path: Path, references_path: Path | None,
              reference_columns: tuple[str, ...] | None = None) -> tuple[Table, Table, list[str]]:
    """The predictions and references tables, checked against each other, and warnings to show."""
    predictions = read_table(predictions_path, PREDICTION_COLUMNS)
    references = _read_references(predictions, references_path, reference_columns)
    if predictions.path.resolve() == references.path.resolve() and predictions.column in references.columns:
        where = ("--predictions and --references are the same file" if references_path is not None else
                 "--reference-columns names a column of the predictions file")
        raise UserError(f"{where} ({predictions_path}) and column {predictions.column}: it would score itself")
    problems = []
    no_reference = [name for name in predictions.values if name not in references.values]
    if no_reference:
        problems.append(_missing_message(no_reference, predictions.path, references.path))
    no_prediction = [name for name in references.values if name not in predictions.values]
    if no_prediction:
        problems.append(_missing_message(no_prediction, references.path, predictions.path))
    if problems:
        raise UserError("; ".join(problems))
    empty_refs = [name for name, texts in references.values.items() if not any(t.strip() for t in texts)]
    if empty_refs:
        first = min(empty_refs, key=references.lines.__getitem__)
        at = f"{references.path}: line {references.lines[first]}"
        if len(references.columns) == 1:
            raise UserError(f"{at}: empty {references.column} for fname {first!r} ({len(empty_refs)} empty in "
                            "all); every reference needs text")
        raise UserError(f"{at}: every reference ({references.column}) is empty for fname {first!r} "
                        f"({len(empty_refs)} such rows in all); each row needs at least one reference with text")
    warnings = []
    if empty := sum(not texts[0].strip() for texts in predictions.values.values()):
        warnings.append(f"{empty} of {len(predictions.values)} predictions in {predictions.path} are empty; "
                        "they score 0")
    if references_path is not None and predictions.path != references.path:
        try:
            own = read_table(predictions_path, ("reference",), numbered=True).values
        except UserError:
            own = {}
        differ = sum(not _same_texts(own[name], references.values[name]) for name in own)
        if differ:
            warnings.append(f"{differ} of {len(own)} rows of {predictions.path} carry a reference that differs "
                            f"from {references.path} (predictions made on another dev file?)")
    if partly := sum(not all(t.strip() for t in texts) for texts in references.values.values()):
        warnings.append(f"{partly} of {len(references.values)} rows of {references.path} have an empty reference "
                        f"among {references.column}; they are scored against their other references")
    return predictions, references, warnings


def _column_names(text: str) -> tuple[str, ...]:
    """--reference-columns `a,b,c` as names; blank, repeated or fname entries are errors."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names) or len(set(names)) < len(names):
        raise UserError(f"--reference-columns: expected distinct column names separated by commas, got {text!r}")
    if "fname" in names:
        raise UserError("--reference-columns: fname is the id column that joins the files, not a reference")
    return names


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, join the two files on fname, and print ROUGE F1 as one JSON line."""
    parser = ArgumentParser(prog="python -m loop.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", required=True, type=Path,
                        help="CSV with fname,summary (a submission) or fname,prediction (predictions/step_N.csv)")
    parser.add_argument("--references", type=Path,
                        help="CSV with fname,summary (e.g. dev.csv), fname,reference, or several references "
                             "(fname,summary1,summary2,...); default: the predictions file's own reference "
                             "column(s)")
    parser.add_argument("--reference-columns", metavar="COL[,COL...]",
                        help="the reference columns to read, e.g. summary1,summary2,summary3; default: found on "
                             "their own (summary, reference, summary1..N or reference1..N)")
    parser.add_argument("--aggregate", choices=AGGREGATES, default="mean",
                        help="per row, each ROUGE type's F1 over the references: mean (default) or max")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="mecab", help="ROUGE token unit")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    args = parser.parse_args(argv)

    columns = _column_names(args.reference_columns) if args.reference_columns is not None else None
    predictions, references, warnings = load_pair(args.predictions, args.references, columns)
    fnames = list(references.values)
    result = compute_rouge([predictions.values[f][0] for f in fnames], [references.values[f] for f in fnames],
                           args.tokenizer, args.aggregate)
    scores = {
        "rouge_1": round(result.rouge_1, 6),
        "rouge_2": round(result.rouge_2, 6),
        "rouge_l": round(result.rouge_l, 6),
        "rouge_mean": round(result.rouge_mean, 6),
        "rouge_mean_x100": round(100 * result.rouge_mean, 4),  # as a leaderboard shows it
        "tokenizer": result.tokenizer,
        "aggregate": result.aggregate,
        "references": result.references,
        "n": result.n,
    }
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(json.dumps(scores, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
