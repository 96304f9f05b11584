"""Score a predictions CSV against a references CSV (columns `fname,summary`); print ROUGE as JSON."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from loop.data import read_text
from loop.errors import UserError, run_cli
from loop.rouge import TOKENIZERS, compute_rouge

REQUIRED_COLUMNS = ("fname", "summary")
_SHOW_MISSING = 5


def read_summaries(path: str | Path) -> dict[str, str]:
    """Read a UTF-8 CSV with columns `fname,summary` (extra columns ignored) into {fname: summary}."""
    path = Path(path)
    expected = f"expected a UTF-8 CSV with columns {','.join(REQUIRED_COLUMNS)}"
    text = read_text(path, expected)

    # newline="" keeps CR/LF inside quoted fields intact, as the csv module requires.
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise UserError(f"{path}: file is empty ({expected})")
        columns = [name.strip() for name in header]
        missing = [name for name in REQUIRED_COLUMNS if name not in columns]
        if missing:
            raise UserError(
                f"{path}: missing column(s) {', '.join(missing)} in header {','.join(columns)!r} ({expected})"
            )
        fname_col, summary_col = (columns.index(name) for name in REQUIRED_COLUMNS)
        summaries: dict[str, str] = {}
        first_line: dict[str, int] = {}
        line = reader.line_num + 1
        for row in reader:
            if row:  # blank lines carry no record
                if len(row) <= max(fname_col, summary_col):
                    raise UserError(
                        f"{path}: line {line}: expected {len(columns)} fields, found {len(row)} ({expected})"
                    )
                fname = row[fname_col].strip()
                if not fname:
                    raise UserError(f"{path}: line {line}: empty fname")
                if fname in summaries:
                    raise UserError(
                        f"{path}: line {line}: duplicate fname {fname!r} (first on line {first_line[fname]})"
                    )
                summaries[fname] = row[summary_col]
                first_line[fname] = line
            line = reader.line_num + 1
    except csv.Error as err:
        raise UserError(f"{path}: line {reader.line_num}: malformed CSV: {err}") from None
    if not summaries:
        raise UserError(f"{path}: no data rows after the header ({expected})")
    return summaries


def _missing_message(names: list[str], present_in: Path, absent_from: Path) -> str:
    shown = ", ".join(repr(name) for name in names[:_SHOW_MISSING])
    more = f", ... ({len(names) - _SHOW_MISSING} more)" if len(names) > _SHOW_MISSING else ""
    return f"{len(names)} fname(s) in {present_in} missing from {absent_from}: {shown}{more}"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, join the two CSVs on fname, and print ROUGE F1 as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m loop.score", description=__doc__)
    parser.add_argument("--predictions", required=True, type=Path, help="CSV with columns fname,summary")
    parser.add_argument("--references", required=True, type=Path, help="CSV with columns fname,summary")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="mecab", help="ROUGE token unit")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    args = parser.parse_args(argv)

    predictions = read_summaries(args.predictions)
    references = read_summaries(args.references)
    problems = []
    no_reference = [name for name in predictions if name not in references]
    if no_reference:
        problems.append(_missing_message(no_reference, args.predictions, args.references))
    no_prediction = [name for name in references if name not in predictions]
    if no_prediction:
        problems.append(_missing_message(no_prediction, args.references, args.predictions))
    if problems:
        raise UserError("; ".join(problems))

    fnames = list(references)
    result = compute_rouge([predictions[f] for f in fnames], [references[f] for f in fnames], args.tokenizer)
    scores = {
        key: round(value, 6) if isinstance(value, float) else value for key, value in result.as_dict().items()
    }
    print(json.dumps(scores, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
