"""Hostile data files: whatever read_examples accepts is exactly what tokenize_file tokenizes; the rest is one line.

Classes covered: line ends (CRLF, lone CR, none at the end, U+2028 / NEL / form feed inside fields); byte order
marks and encodings (one or two UTF-8 BOMs, UTF-16/32 with and without a mark, CP949, mixed, NUL bytes); CSV
structure (quoted newlines and the line numbers after them, blank and all-empty rows, empty and header-only files,
blank lines or Excel's `sep=` before the header, duplicated / spaced / quoted / unnamed / extra / 3,000 columns,
short and long rows, a repeated header, unterminated and misplaced quotes, TSV and semicolon files, a 160,000
character field); values (whitespace only, empty after strip, ids such as 01, 1.0, NA, null, nan, None, huge ids,
duplicates after strip and across multi-line rows); JSON (extra, reordered, missing and later-only keys, numbers,
booleans, null, NaN, lists and objects as values, duplicate keys, unpaired surrogate escapes, raw U+2028, CRLF and
CR line ends, blank lines, arrays of objects on one or many lines, empty / unclosed arrays, pretty-printed
objects, trailing commas, a BOM mid-file, NUL escapes); row limits larger than the file; file suffixes; the
tokenized output of valid files pinned to the earlier implementation; the disk cache of tokenize_file.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import datasets
import pytest

from loop.config import DataConfig
from loop.data import read_examples, tokenize_file, with_bos_eos
from loop.errors import UserError

# Every case tried, with what the code did before this file existed -> what it does now. Keep adding to it.
CASES_TRIED = [
    "plain CSV with quoted multi-line dialogues: accepted -> accepted",
    "CRLF line ends: accepted -> accepted (a CRLF inside a quoted field is kept, as before)",
    "lone CR line ends: accepted -> accepted",
    "UTF-8 BOM: accepted -> accepted",
    "two UTF-8 BOMs: missing column fname ('\\ufefffname') -> accepted",
    "no newline at the end: accepted -> accepted",
    "blank lines between rows and at the end: accepted -> accepted",
    "blank lines before the header: TypeError traceback -> accepted",
    "a whitespace-only line: 'empty fname' -> skipped as blank",
    "',,' rows spreadsheets leave: 'empty fname' -> skipped as blank",
    "header only / empty file: 'no data rows' -> same",
    "blank lines only: TypeError traceback -> 'no data rows'",
    "a used column named twice: validated on one column, trained on the other (a TypeError traceback after a blank "
    "line) -> error naming both columns",
    "an unused column named twice: accepted -> accepted",
    "trailing comma on every line / on the data rows only: accepted -> accepted",
    "a row with a non-empty extra field (unquoted comma): the rest silently dropped -> error",
    "a space before an opening quote: fields silently split -> error (too many fields)",
    "a row too short for an unused column: accepted -> accepted",
    "a row too short for the summary: 'empty summary' -> same",
    "columns in another order, with extra columns: accepted -> accepted",
    "spaces after the header commas: missing columns -> accepted",
    "quoted header names: accepted -> accepted",
    "whitespace-only or empty-after-strip dialogue (also multi-line): error -> same",
    "ids 1 / 01 / 1.0, NA / null / nan / None, a 23-digit id: kept as text -> same",
    "ids equal after strip: duplicate -> duplicate",
    "summaries NA / #N/A, dialogue N/A: kept as text -> same",
    "a NUL byte: accepted -> error with its line",
    "UTF-16 LE/BE with a byte order mark: 'byte 0xff is not valid UTF-8' -> 'the file is UTF-16'",
    "UTF-16 without a mark: 'byte 0xb3 is not valid UTF-8' -> same, plus 'it looks like UTF-16'",
    "UTF-16 without a mark, ASCII only: missing columns (names full of NULs) -> 'NUL byte' on line 1",
    "CP949 file: not valid UTF-8 -> same, plus a CP949 hint",
    "UTF-8 with one CP949 row: error on its line -> same",
    "CR-only file with a bad byte on line 3: reported as line 1 -> line 3",
    "a .csv that is tab- or semicolon-separated: missing columns -> same, plus 'the header has no commas'",
    "Excel 'sep=,' first line: TypeError traceback -> accepted",
    "'sep=;' first line: missing columns -> error naming the declared separator",
    "3,000 columns: accepted -> accepted",
    "a 160,000-character dialogue: 'malformed CSV (field larger than field limit)' -> accepted",
    "an error after quoted multi-line rows: line of the row's end -> line of the row's start",
    "an unterminated quote: 'unexpected end of data' at the wrong line -> the line where its row starts",
    "a character after a closing quote: wrong line (the one before) -> the right line",
    "quotes inside an unquoted field: kept literally -> same",
    "the header repeated mid-file (files concatenated): trained on as a row -> error",
    "U+2028 or a form feed in an unquoted field: row split in two, 'empty summary' -> accepted, kept in the text",
    "NEL (U+0085) in a quoted field: accepted -> accepted",
    "a CRLF inside a quoted field of an LF file: accepted -> accepted",
    "max_train_samples larger than the file: all rows -> same",
    "a limit with blank lines before the rows: accepted -> accepted",
    "a limit with a bad row after it: accepted (only used rows validated) -> same",
    ".CSV suffix: accepted -> accepted; .txt: error -> same",
    "zero-width space as the whole id: accepted -> accepted (not fixed; tokenized as validated)",
    "JSONL: plain, CRLF, CR-only, blank lines, key order, long dialogue: accepted -> accepted",
    "JSONL with extra keys / a key only on later lines: DatasetGenerationError traceback -> accepted",
    "JSONL missing a key on a later line: 'empty summary' -> same",
    "JSONL integer ids: accepted -> accepted; 7 and '7': duplicate -> duplicate",
    "JSONL float / boolean / NaN id: accepted as '1.5', 'True', 'nan' -> error",
    "JSONL file with no objects: 'expected a header' -> 'expected at least one JSON object'",
    "JSONL null summary: 'empty summary' -> same",
    "JSONL number summary: trained on as '3' -> error",
    "JSONL list dialogue: DatasetGenerationError traceback -> error",
    "JSONL object dialogue: validated as str(dict), trained on another string -> error",
    "JSONL duplicate key in one object: traceback -> error",
    "JSON array of objects, one line or pretty-printed: 'expected a JSON object per line' -> accepted",
    "JSON array with a non-object item / a bad value: error -> error naming the item's line",
    "empty / unclosed / trailing-data JSON array: error -> error",
    "a trailing comma inside a JSON array: error -> accepted (lenient)",
    "a pretty-printed single object: invalid JSON line 1 -> same",
    "U+2028 or NEL unescaped in a JSONL string: 'invalid JSON (Unterminated string)' -> accepted",
    "an unpaired surrogate escape: DatasetGenerationError traceback -> error",
    "an escaped NUL (\\u0000): accepted -> accepted (deliberate content)",
    "a JSON list instead of an object on a line: error -> error",
    "a trailing comma after a JSONL object: invalid JSON -> same",
    "a BOM at the start of a later JSONL line: invalid JSON -> same",
    "whitespace-only JSONL dialogue: 'empty dialogue' -> same",
]

H = "fname,dialogue,summary\n"
R1 = 'a1,"#Person1#: 안녕하세요.\n#Person2#: 네, 안녕하세요.",#Person1#과 #Person2#가 인사했다.\n'  # lines 2-3
R2 = 'a2,"#Person1#: 내일 3시에 봐요.\n#Person2#: 좋아요.",#Person1#과 #Person2#는 내일 3시에 만난다.\n'
R3 = "a3,#Person1#: 배고파요.,#Person1#은 배가 고프다.\n"
LONG = "#Person1#: " + "가나다라마바사 " * 20000  # 160,011 characters: above csv's default field limit
O1 = {"fname": "a1", "dialogue": "#Person1#: 안녕하세요.\n#Person2#: 네.", "summary": "인사했다."}
O2 = {"fname": "a2", "dialogue": "#Person1#: 내일 봐요.", "summary": "내일 만난다."}


def jsonl(*objs: dict) -> str:
    return "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs)


def case(name: str, content: str | bytes, expected: str | list, file: str = "train.csv", limit: int = 0):
    """A table row: expected is an error fragment, or the validated rows (ids, or full rows) when accepted."""
    return pytest.param(file, content, expected, limit, id=name)


CASES = [
    # ---- CSV line ends, blank lines, BOMs
    case("plain", H + R1 + R2 + R3, ["a1", "a2", "a3"]),
    case("crlf", (H + R1 + R2 + R3).replace("\n", "\r\n"), ["a1", "a2", "a3"]),
    case("cr_only", (H + R1 + R2 + R3).replace("\n", "\r"), ["a1", "a2", "a3"]),
    case("bom", "\ufeff" + H + R1 + R2, ["a1", "a2"]),
    case("double_bom", "\ufeff\ufeff" + H + R1 + R2, ["a1", "a2"]),
    case("no_final_newline", H + R1 + R3.rstrip("\n"), ["a1", "a3"]),
    case("blank_lines", H + "\n" + R1 + "\n\n" + R3 + "\n", ["a1", "a3"]),
    case("blank_before_header", "\n\n" + H + R1, ["a1"]),
    case("whitespace_line", H + R1 + "   \n" + R3, ["a1", "a3"]),
    case("empty_comma_rows", H + R1 + ",,\n , ,\n", ["a1"]),
    case("header_only", H, "no data rows; expected a header and at least one row"),
    case("empty_file", "", "no data rows"),
    case("blank_only_file", "\n \n\r\n", "no data rows"),
    # ---- columns
    case("dup_summary_column", "fname,dialogue,summary,summary\na1,대화,첫요약,둘째요약\n",
         "line 1: column `summary` appears 2 times in the header (columns 3, 4)"),
    case("dup_dialogue_column", "fname,dialogue,dialogue,summary\na1,첫대화,둘째대화,요약\n",
         "column `dialogue` appears 2 times in the header (columns 2, 3)"),
    case("dup_column_after_blank_line", "\nfname,fname,dialogue,summary\na,b,c,d\n",
         "line 2: column `fname` appears 2"),
    case("dup_unused_column", "fname,x,dialogue,x,summary\na1,1,대화,2,요약\n",
         [{"id": "a1", "dialogue": "대화", "summary": "요약"}]),
    case("trailing_comma_all", "fname,dialogue,summary,\na1,대화,요약,\n", ["a1"]),
    case("trailing_comma_rows", H + "a1,대화,요약,\na2,대화,요약,,\n", ["a1", "a2"]),
    case("extra_nonempty_field", H + R1 + "a2,대화,요약, 나머지\n",
         "row 2 (line 4): 4 fields but the header has 3; a field that contains a comma must be quoted"),
    case("space_before_quote", H + 'a1, "대화, 둘", 요약\n', "row 1 (line 2): 4 fields but the header has 3"),
    case("short_row_unused_column", "fname,dialogue,summary,topic\na1,대화,요약\n", ["a1"]),
    case("short_row_summary", H + R1 + "a3,대화\n", "row 2 (line 4): empty `summary`"),
    case("reordered_extra_columns", "topic,fname,x,dialogue,summary\nt,a1,y,대화,요약\n",
         [{"id": "a1", "dialogue": "대화", "summary": "요약"}]),
    case("header_spaces", "fname, dialogue ,summary \na1,대화,요약\n", ["a1"]),
    case("quoted_header", '"fname","dialogue","summary"\n"a1","대화","요약"\n', ["a1"]),
    case("many_columns", ",".join(f"c{i}" for i in range(3000)) + "," + H + "x," * 3000 + "a1,대화,요약\n", ["a1"]),
    case("tsv", "fname\tdialogue\tsummary\na1\t대화\t요약\n",
         "missing column(s) fname, dialogue, summary; found 'fname\\tdialogue\\tsummary'"),
    case("tsv_hint", "fname\tdialogue\tsummary\na1\t대화\t요약\n", "the header has no commas"),
    case("semicolon", "fname;dialogue;summary\na1;대화;요약\n", "the header has no commas"),
    case("excel_sep_line", "sep=,\n" + H + "a1,대화,요약\na1,대화,요약\n", "row 2 (line 4): duplicate fname 'a1'"),
    case("excel_sep_line_ok", "sep=,\r\n" + H + "a1,대화,요약\n", ["a1"]),
    case("excel_sep_semicolon", "sep=;\nfname;dialogue;summary\n", "line 1: the file declares 'sep=;'"),
    case("repeated_header", H + R1 + H + R3, "row 2 (line 4): the header again (files joined together?)"),
    # ---- values
    case("whitespace_field", H + 'a1,"   ",요약\n', "row 1 (line 2): empty `dialogue`"),
    case("dialogue_empty_after_strip", H + R1 + 'a2," \n \t ",요약\n', "row 2 (line 4): empty `dialogue`"),
    case("ids_numeric", H + "1,대화1,요약1\n01,대화2,요약2\n1.0,대화3,요약3\n", ["1", "01", "1.0"]),
    case("ids_na_like", H + "NA,대화1,요약1\nnull,대화2,요약2\nnan,NaN,nan\nNone,대화4,None\n",
         [{"id": "NA", "dialogue": "대화1", "summary": "요약1"},
          {"id": "null", "dialogue": "대화2", "summary": "요약2"},
          {"id": "nan", "dialogue": "NaN", "summary": "nan"},
          {"id": "None", "dialogue": "대화4", "summary": "None"}]),
    case("id_huge", H + "12345678901234567890123,대화,요약\n", ["12345678901234567890123"]),
    case("ids_equal_after_strip", H + " a1,대화,요약\na1 ,대화2,요약2\n",
         "row 2 (line 3): duplicate fname 'a1' (first at row 1 (line 2))"),
    case("summary_na_like", H + "a1,대화,NA\na2,N/A,#N/A\n",
         [{"id": "a1", "dialogue": "대화", "summary": "NA"}, {"id": "a2", "dialogue": "N/A", "summary": "#N/A"}]),
    case("inner_quotes_unquoted", H + 'a1,그가 "안녕"이라 했다,요약\n',
         [{"id": "a1", "dialogue": '그가 "안녕"이라 했다', "summary": "요약"}]),
    case("zero_width_id", H + "\u200b,대화,요약\n", ["\u200b"]),  # found, not fixed: invisible but not blank
    # ---- quoting and line numbers after quoted newlines
    case("long_dialogue", H + R1 + f'a9,"{LONG}",긴 요약\n' + R3,
         [{"id": "a1"}, {"id": "a9", "dialogue": LONG.strip(), "summary": "긴 요약"}, {"id": "a3"}]),
    case("error_after_multiline_rows", H + R1 + R2 + "a3,,요약\n", "row 3 (line 6): empty `dialogue`"),
    case("dup_id_multiline", H + R1 + R2 + R1, "row 3 (line 6): duplicate fname 'a1' (first at row 1 (line 2))"),
    case("dup_id_multiline_crlf", (H + R1 + R2 + R1).replace("\n", "\r\n"), "row 3 (line 6): duplicate fname 'a1'"),
    case("dup_id_multiline_cr", (H + R1 + R2 + R1).replace("\n", "\r"), "row 3 (line 6): duplicate fname 'a1'"),
    case("unterminated_quote", H + R1 + 'a2,"대화\n\n둘째 줄\n',
         "line 4: malformed CSV: a quoted field in the row that starts on this line is never closed"),
    case("char_after_closing_quote", H + R1 + 'a2,"대화"x,요약\n', "line 4: malformed CSV (',' expected after '\"'"),
    case("u2028_unquoted", H + "a1,대화\u2028둘째,요약\n",
         [{"id": "a1", "dialogue": "대화\u2028둘째", "summary": "요약"}]),
    case("formfeed_unquoted", H + "a1,대화\x0c둘째,요약\n",
         [{"id": "a1", "dialogue": "대화\x0c둘째", "summary": "요약"}]),
    case("nel_quoted", H + 'a1,"대화\x85둘째",요약\n',
         [{"id": "a1", "dialogue": "대화\x85둘째", "summary": "요약"}]),
    case("crlf_inside_quotes_lf_file", H + 'a1,"첫줄\r\n둘째",요약\n' + R3,
         [{"id": "a1", "dialogue": "첫줄\r\n둘째", "summary": "요약"}, {"id": "a3"}]),
    # ---- bytes and encodings
    case("nul_byte", H + R1 + "a2,대\x00화,요약\n", "line 4: NUL byte; expected UTF-8 text"),
    case("utf16le_bom", ("\ufeff" + H + "a1,대화,요약\n").encode("utf-16-le"), "the file is UTF-16 or UTF-32"),
    case("utf16be_bom", ("\ufeff" + H + "a1,대화,요약\n").encode("utf-16-be"), "the file is UTF-16 or UTF-32"),
    case("utf16le_no_bom", (H + "a1,대화,요약\n").encode("utf-16-le"), "it looks like UTF-16; save the file as UTF-8"),
    case("utf16le_no_bom_ascii", (H + "a1,hi,ok\n").encode("utf-16-le"), "line 1: NUL byte"),
    case("cp949", (H + "a1,대화,요약\n").encode("cp949"), "line 2: byte 0xb4 is not valid UTF-8"),
    case("cp949_hint", (H + "a1,대화,요약\n").encode("cp949"), "CP949/EUC-KR"),
    case("mixed_encodings", (H + "a1,대화,요약\n").encode() + "a2,대화,요약\n".encode("cp949"),
         "line 3: byte 0xb4 is not valid UTF-8"),
    case("mixed_encodings_cr_only", (H + "a1,대화,요약\r").replace("\n", "\r").encode() + "a2,대화\r".encode("cp949"),
         "line 3: byte 0xb4 is not valid UTF-8"),
    # ---- limits and suffixes
    case("limit_larger_than_file", H + R1 + R2, ["a1", "a2"], limit=10),
    case("limit_after_blank_lines", H + "\n" + R1 + "\n" + R2 + R3, ["a1", "a2"], limit=2),
    case("limit_before_bad_row", H + R1 + "a1,,\n", ["a1"], limit=1),
    case("upper_suffix", H + R1, ["a1"], file="train.CSV"),
    case("txt_suffix", H + R1, "data files must be .csv or .jsonl", file="train.txt"),
    # ---- JSON lines
    case("jsonl_plain", jsonl(O1, O2), [O1 | {"id": "a1"}, O2 | {"id": "a2"}], file="t.jsonl"),
    case("jsonl_crlf", jsonl(O1, O2).replace("\n", "\r\n"), ["a1", "a2"], file="t.jsonl"),
    case("jsonl_cr_only_error_line", jsonl(O1, O2, {"fname": "a3"}).replace("\n", "\r"), "line 3: empty `dialogue`",
         file="t.jsonl"),
    case("jsonl_blank_lines", "\n" + jsonl(O1) + "\n  \n" + jsonl(O2), ["a1", "a2"], file="t.jsonl"),
    case("jsonl_extra_keys", jsonl(O1 | {"topic": "x", "n": [1, 2]}, O2), ["a1", "a2"], file="t.jsonl"),
    case("jsonl_key_only_on_later_line", jsonl(O1, O2 | {"extra": 1}), ["a1", "a2"], file="t.jsonl"),
    case("jsonl_key_order", jsonl(O1, {"summary": "요약", "dialogue": "대화", "fname": "a3"}), ["a1", "a3"],
         file="t.jsonl"),
    case("jsonl_missing_key_later", jsonl(O1, {"fname": "a2", "dialogue": "대화"}), "line 2: empty `summary`",
         file="t.jsonl"),
    case("jsonl_int_ids", jsonl(O1 | {"fname": 7}, O2 | {"fname": 8}), ["7", "8"], file="t.jsonl"),
    case("jsonl_int_and_str_id", jsonl(O1 | {"fname": 7}, O2 | {"fname": "7"}),
         "line 2: duplicate fname '7' (first at line 1)", file="t.jsonl"),
    case("jsonl_float_id", jsonl(O1 | {"fname": 1.5}),
         "line 1: `fname` must be a string or an integer, got a number (1.5)", file="t.jsonl"),
    case("jsonl_bool_id", jsonl(O1 | {"fname": True}), "`fname` must be a string or an integer, got a boolean (true)",
         file="t.jsonl"),
    case("jsonl_nan_id", '{"fname": NaN, "dialogue": "d", "summary": "s"}\n', "got a number (NaN)", file="t.jsonl"),
    case("jsonl_null_summary", jsonl(O1 | {"summary": None}), "line 1: empty `summary`", file="t.jsonl"),
    case("jsonl_number_summary", jsonl(O1, O2 | {"summary": 3}), "line 2: `summary` must be a string, got a number (3)",
         file="t.jsonl"),
    case("jsonl_list_dialogue", jsonl(O1 | {"dialogue": ["#Person1#: 안녕", "#Person2#: 네"]}),
         "line 1: `dialogue` must be a string, got a list", file="t.jsonl"),
    case("jsonl_object_dialogue", jsonl(O1 | {"dialogue": {"text": "안녕"}}),
         "line 1: `dialogue` must be a string, got an object", file="t.jsonl"),
    case("jsonl_duplicate_key", jsonl(O1) + '{"fname": "a2", "dialogue": "d", "summary": "첫", "summary": "둘"}\n',
         "line 2: key summary appears twice in one object", file="t.jsonl"),
    case("jsonl_u2028", jsonl(O1 | {"dialogue": "#Person1#: 안녕\u2028하세요"}, O2),
         [{"id": "a1", "dialogue": "#Person1#: 안녕\u2028하세요", "summary": "인사했다."}, {"id": "a2"}],
         file="t.jsonl"),
    case("jsonl_nel", jsonl(O1 | {"dialogue": "안녕\x85하세요"}, O2), ["a1", "a2"], file="t.jsonl"),
    case("jsonl_lone_surrogate", jsonl(O1) + '{"fname": "a2", "dialogue": "\\ud83d 대화", "summary": "s"}\n',
         "line 2: `dialogue` contains an unpaired surrogate escape", file="t.jsonl"),
    case("jsonl_escaped_nul", '{"fname": "a1", "dialogue": "\\u0000 대화", "summary": "s"}\n',
         [{"id": "a1", "dialogue": "\x00 대화", "summary": "s"}], file="t.jsonl"),
    case("jsonl_line_not_object", jsonl(O1) + '["a2", "d", "s"]\n',
         "line 2: expected a JSON object per line, found a list", file="t.jsonl"),
    case("jsonl_trailing_comma", jsonl(O1).rstrip("\n") + ",\n" + jsonl(O2), "line 1: invalid JSON (Extra data)",
         file="t.jsonl"),
    case("jsonl_bom_mid_file", jsonl(O1) + "\ufeff" + jsonl(O2), "line 2: invalid JSON (Unexpected UTF-8 BOM",
         file="t.jsonl"),
    case("jsonl_pretty_object", json.dumps(O1, indent=2), "line 1: invalid JSON", file="t.jsonl"),
    case("jsonl_long_dialogue", jsonl(O1 | {"dialogue": LONG}), ["a1"], file="t.jsonl"),
    case("jsonl_whitespace_dialogue", jsonl(O1 | {"dialogue": "  \n "}), "line 1: empty `dialogue`", file="t.jsonl"),
    case("jsonl_limit_larger", jsonl(O1, O2), ["a1", "a2"], file="t.jsonl", limit=5),
    case("jsonl_empty", "\n\n", "no data rows; expected at least one JSON object", file="t.jsonl"),
    # ---- JSON arrays
    case("json_array_one_line", json.dumps([O1, O2], ensure_ascii=False), ["a1", "a2"], file="t.json"),
    case("json_array_pretty", json.dumps([O1, O2], ensure_ascii=False, indent=2), ["a1", "a2"], file="t.json"),
    case("json_array_in_jsonl_file", json.dumps([O1, O2], ensure_ascii=False), ["a1", "a2"], file="t.jsonl"),
    case("json_array_bad_value", json.dumps([O1, O2 | {"summary": 5}], ensure_ascii=False, indent=2),
         "item 2 (line 7): `summary` must be a string, got a number (5)", file="t.json"),
    case("json_array_not_object", json.dumps([O1, 5], indent=2), "line 7: expected a JSON object in the array, found a "
         "number (5)", file="t.json"),
    case("json_array_trailing_comma", '[{"fname": "a", "dialogue": "d", "summary": "s"},]', ["a"], file="t.json"),
    case("json_array_empty", " [ ] ", "no data rows", file="t.json"),
    case("json_array_unclosed", '[{"fname": "a", "dialogue": "d", "summary": "s"},\n',
         "line 2: invalid JSON (the array that starts on line 1 is never closed)", file="t.json"),
    case("json_array_missing_comma", '[{"fname": "a", "dialogue": "d", "summary": "s"}\n{}]',
         "line 2: invalid JSON (expected `,` or `]`", file="t.json"),
    case("json_array_extra_data", '[{"fname": "a", "dialogue": "d", "summary": "s"}]\n{}',
         "line 2: invalid JSON (extra data after the array)", file="t.json"),
    case("json_array_bad_json", '[\n{"fname": "a", "dialogue": "d", "summary": "s"},\n{"fname": }]',
         "line 3: invalid JSON (Expecting value)", file="t.json"),
]


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def expected_tokens(rows: list[dict[str, str]], tokenizer, max_source: int, max_target: int) -> dict[str, list]:
    """What training must see: each validated row tokenized on its own, in file order."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    src = [tokenizer(r["dialogue"], add_special_tokens=False)["input_ids"] for r in rows]
    ids = [with_bos_eos(s, bos, eos, max_source) for s in src]
    return {"input_ids": ids, "attention_mask": [[1] * len(s) for s in ids],
            "labels": [with_bos_eos(tokenizer(r["summary"], add_special_tokens=False)["input_ids"], bos, eos,
                                    max_target) for r in rows],
            "idx": list(range(len(rows))), "source_len": [len(s) for s in src]}


@pytest.mark.parametrize(("file", "content", "expected", "limit"), CASES)
def test_hostile_file(tmp_path, tokenizer, file, content, expected, limit):
    path = write(tmp_path, file, content)
    cfg = DataConfig()
    if isinstance(expected, str):
        for attempt in (lambda: read_examples(path, cfg, limit),
                        lambda: tokenize_file(path, cfg, tokenizer, 64, 16, limit)):
            with pytest.raises(UserError) as err:
                attempt()
            message = str(err.value)
            assert message.startswith(f"{path}: ") and "\n" not in message and expected in message, message
        return
    rows = read_examples(path, cfg, limit)
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected, strict=True):
        assert row == row | ({"id": want} if isinstance(want, str) else {k: v for k, v in want.items() if k != "fname"})
    ds = tokenize_file(path, cfg, tokenizer, 64, 16, limit)
    assert ds.column_names == ["input_ids", "attention_mask", "labels", "idx", "source_len"]
    assert ds.to_dict() == expected_tokens(rows, tokenizer, 64, 16)


# sha256 of tokenize_file's output (columns, features, rows), computed with the implementation that re-read the
# file through datasets.load_dataset (pandas CSV / pyarrow JSON; commit 0e0b43a) before it read the validated rows.
# It must not move: valid files train on byte-identical inputs.
PINNED = {
    "csv": "7733c9f4128bf26162f7b45e9376d57fa8b8a3b2f8dd95f3dd07c53a58bc6e99",
    "bom_crlf": "ca4d71af0fab6c7ac71e36478a54d824c77d12347cf0d90ea3473f2686809924",
    "jsonl": "07aec5722fdc2a8186d7f5110ec3a9c2955941bc19bb33306672192085a9969a",
    "limit2": "85b28d7d87a88db7460111663899a8984a4670ac5bdcfc86bdc89bd0ef181c44",
}


def pinned_files() -> dict[str, tuple[bytes, str, DataConfig, int]]:
    long_row = 'a9,"#Person1#: ' + " ".join(["안녕하세요"] * 200) + '",짧은 요약\n'
    text = H + R1 + R2 + long_row + '007,"  #Person1#: 네  ",NA\n'
    lines = "".join(json.dumps({"id": f"x{i}", "text": f"#Person1#: 안녕 {i}번\n#Person2#: 네", "target": f"인사 {i}"},
                               ensure_ascii=False) + "\n" for i in range(3)) + "\n"
    custom = DataConfig(id_column="id", dialogue_column="text", summary_column="target")
    return {"csv": (text.encode(), "d.csv", DataConfig(), 0),
            "bom_crlf": (b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode(), "d.csv", DataConfig(), 0),
            "jsonl": (lines.encode(), "d.jsonl", custom, 0),
            "limit2": (text.encode(), "d.csv", DataConfig(), 2)}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_valid_files_tokenize_exactly_as_before(tmp_path, tokenizer, name):
    raw, file, cfg, limit = pinned_files()[name]
    ds = tokenize_file(write(tmp_path, file, raw), cfg, tokenizer, 32, 8, limit)
    blob = json.dumps({"columns": ds.column_names, "features": ds.features.to_dict(), "rows": ds.to_dict()},
                      sort_keys=True)
    assert hashlib.sha256(blob.encode()).hexdigest() == PINNED[name]


def test_tokenize_file_caches_on_disk_by_content(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    path = write(tmp_path, "train.csv", H + R1 + R2)
    first = tokenize_file(path, DataConfig(), tokenizer, 64, 16)
    cached = sorted((tmp_path / "cache").rglob("*.arrow"))
    assert len(cached) == 1 and [Path(f["filename"]) for f in first.cache_files] == cached
    again = tokenize_file(path, DataConfig(), tokenizer, 64, 16)
    assert again.cache_files == first.cache_files and again.to_dict() == first.to_dict()
    # The key follows what the output depends on: the texts and the lengths (the id does not change the output).
    write(tmp_path, "train.csv", H + R1 + R2.replace("좋아요", "싫어요"))
    tokenize_file(path, DataConfig(), tokenizer, 64, 16)
    tokenize_file(path, DataConfig(), tokenizer, 32, 16)
    assert len(list((tmp_path / "cache").rglob("*.arrow"))) == 3
    datasets.disable_caching()
    try:
        assert tokenize_file(path, DataConfig(), tokenizer, 48, 16).cache_files == []
    finally:
        datasets.enable_caching()
    assert len(list((tmp_path / "cache").rglob("*.arrow"))) == 3


def test_validated_rows_are_the_only_source(tmp_path, tokenizer):
    path = write(tmp_path, "train.csv", H + R1 + R2 + R3)
    rows = read_examples(path, DataConfig())
    whole = tokenize_file(path, DataConfig(), tokenizer, 64, 16)
    path.unlink()  # given the rows, the file is not read again
    assert tokenize_file(path, DataConfig(), tokenizer, 64, 16, rows=rows).to_dict() == whole.to_dict()
    assert tokenize_file(path, DataConfig(), tokenizer, 64, 16, limit=2, rows=rows)["idx"] == [0, 1]


def test_csv_field_size_limit_is_restored(tmp_path):
    before = csv.field_size_limit()
    read_examples(write(tmp_path, "a.csv", H + f'a9,"{LONG}",요약\n'), DataConfig())
    with pytest.raises(UserError):
        read_examples(write(tmp_path, "b.csv", H + 'a,"open\n'), DataConfig())
    assert csv.field_size_limit() == before
