"""Tests for the synthetic DialogSum-style data generator."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import re
from pathlib import Path

import pytest

from loop import synthetic
from loop.errors import UserError
from loop.synthetic import (
    MASK_TOKENS,
    SPEAKER_TOKENS,
    ensure_demo_data,
    generate_rows,
    summary_slots,
    topic_template_summary,
    write_csv,
)

LINE_RE = re.compile(r"^#Person[123]#: \S.*$")
GOLDEN_SHA256 = "e0b0da1b05d147ee7ade338f8a32a5df33cf454f9760cbbd2b5d3184c687ef91"

# sha256 digests recorded from the generator before its templates and slot values moved from loop/synthetic.py
# into loop/synthetic_templates.toml (GENERATOR_VERSION 1). Any change to the generated data fails these tests;
# if it is on purpose, bump GENERATOR_VERSION and re-record them.
PINNED_ROWS = {  # (n, seed, prefix) -> digests of the rows' JSON and of their templates and slots
    (1, 0, "train"): {
        "rows": "fe1070adce715a35cb8053248b0be09e7529ebd00cd993590d593516b24909ad",
        "templates": "9a93b59c72dad5a7a33490f00786cd4580d318efa8ff359819f09cec72ac444c",
        "slots": "be381338823610d73c7f34b82147e3ea1ea962fbd13ec98f024af5ec175e39a0",
    },
    (500, 3, "train"): {
        "rows": "e7fc9fbdc171534ae888fc9688add3de5509d4d92bd1ced0f140785d8d2c3231",
        "templates": "b0d4d2d3ea8dfc2545ce7be4e333bb581f5a72dff569c2c6876bcefa3fe3f13c",
        "slots": "ee8178d5bbd6cbf51ec2edaf7ccffe81956063bf6a2419248f77a0d08730a638",
    },
    (50, 7, "dev"): {
        "rows": "de5b0f7661e196c3eb081ca80c9617fad2f905f583b8264e4581e83585b273fa",
        "templates": "d4b448e33f48c9fdf7b1035b9d14594611395cdb1db5156ed62d102758919ef2",
        "slots": "8201daa0b8650a7cd70fd198c3284b226de5670ea56edbd7f5ffec00f29ac113",
    },
    (300, 12345, "x"): {
        "rows": "c918e36548427555f200cf57554c8748626509d6fd3a22c67af48169abd75272",
        "templates": "f75d4f1e0badf51e472d966da73f16ec164560a2468c6ea561bfd39f99e9d3b1",
        "slots": "9bbd9bf19e867072f818389ffd21837be511e1c2236cde302f3c8bd71e64b8ea",
    },
}
PINNED_DEMO_CSV = {  # (train rows, dev rows) at seed 0: the demo and the test sizes -> (train.csv, dev.csv)
    (3000, 100): (
        "d9d79205f0e178913361a123333d9604390b8501dd320b2c744e86d25f79e8fb",
        "37cfb116d57485c620b7dcf0dcaaabcaac3a72691e3e5d09ab3be7e10131fc84",
    ),
    (160, 12): (
        "ef1a8afbf6dac8132cd6ca6e3d75c62c1a608d1ebded6917f3e4c7bbc116d25b",
        "d858e9729c44a27464c5b2c09fb99b3fdaee54f113627e2c4287d1c194138071",
    ),
}


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return generate_rows(500, seed=3)


def test_same_seed_same_rows_and_different_seed_differs(rows):
    assert generate_rows(500, seed=3) == rows
    other = generate_rows(500, seed=4)
    assert sum(a["dialogue"] == b["dialogue"] for a, b in zip(rows, other, strict=True)) < 10


def test_row_shape_and_fname(rows):
    assert [r["fname"] for r in rows[:3]] == ["train_00000", "train_00001", "train_00002"]
    assert generate_rows(2, seed=3, prefix="dev")[1]["fname"] == "dev_00001"
    assert all(set(r) == {"fname", "dialogue", "summary"} for r in rows)


def test_speaker_lines_format_and_turn_counts(rows):
    counts = set()
    for r in rows:
        lines = r["dialogue"].split("\n")
        counts.add(len(lines))
        assert all(LINE_RE.match(line) for line in lines), r["dialogue"]
        assert lines[0].startswith("#Person1#: ")
        assert any(line.startswith("#Person2#: ") for line in lines)
    assert min(counts) >= 4 and max(counts) <= 11 and len(counts) >= 5
    assert any("#Person3#: " in r["dialogue"] for r in rows)


def test_summaries_refer_to_speakers_and_have_moderate_length(rows):
    assert all(re.search(r"#Person[12]#", r["summary"]) for r in rows)
    assert all(20 <= len(r["summary"]) <= 110 for r in rows)
    assert not any("{" in r["summary"] or "}" in r["dialogue"] for r in rows)


def test_every_summary_carries_two_slot_values_from_its_dialogue():
    for dialogue, summary, slots in itertools.islice(synthetic._examples(5), 300):
        assert len(slots) >= 2, summary
        for value in slots.values():
            assert value in summary and value in dialogue, (value, dialogue, summary)
        assert summary_slots(summary)[1] == slots


def test_summary_slots_are_spoken_in_every_variant():
    # Static check: each summary slot is in every phrasing of at least one always-spoken beat.
    for topic in synthetic._TOPICS:
        for outcome in topic.outcomes:
            beats = (*topic.beats, *outcome.beats)
            for slot in synthetic._template_slots(outcome.summary):
                assert any(
                    all(f"{{{slot}}}" in p or f"{{{slot}:" in p for p in phrasings) for _, phrasings in beats
                ), (topic.name, slot)
            assert len(set(synthetic._template_slots(outcome.summary))) >= 2, topic.name


def test_at_least_ten_topics_and_masks_occur(rows):
    topics = {summary_slots(r["summary"])[0] for r in rows}
    assert len(topics) >= 10
    text = "\n".join(r["dialogue"] for r in rows)
    assert sum(token in text for token in MASK_TOKENS) >= 6
    assert any(token in r["summary"] for r in rows for token in MASK_TOKENS)
    assert SPEAKER_TOKENS == ("#Person1#", "#Person2#", "#Person3#")


def test_particles_agree_with_the_host_word():
    assert synthetic._attach("김민준", "은") == "김민준은"
    assert synthetic._attach("김민수", "은") == "김민수는"
    assert synthetic._attach("오후 3시", "으로") == "오후 3시로"
    assert synthetic._attach("오전 10시 30분", "으로") == "오전 10시 30분으로"
    assert synthetic._attach("5월 1일", "으로") == "5월 1일로"
    assert synthetic._attach("#Person1#", "은") == "#Person1#은"
    assert synthetic._attach("#Person2#", "은") == "#Person2#는"


def test_topic_template_summary_keeps_template_and_drops_values(rows):
    changed = 0
    for r in rows[:100]:
        template = topic_template_summary(r)
        topic, _ = summary_slots(r["summary"])
        assert summary_slots(template)[0] == topic
        assert template[:9] == r["summary"][:9]  # the speaker stays
        changed += template != r["summary"]
    assert changed >= 95
    with pytest.raises(ValueError):
        topic_template_summary({"summary": "전혀 다른 요약이다."})


def test_csv_round_trip_keeps_newlines(tmp_path, rows):
    path = tmp_path / "out" / "train.csv"
    write_csv(path, rows[:50])
    with path.open(encoding="utf-8", newline="") as f:
        back = list(csv.DictReader(f))
    assert back == rows[:50]
    assert "\n" in back[0]["dialogue"]
    assert path.read_bytes().startswith(b"fname,dialogue,summary\n")
    assert [p.name for p in path.parent.iterdir()] == ["train.csv"]  # no temp file left behind


def _read(path):
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_ensure_demo_data_regenerates_only_when_settings_change(tmp_path):
    train, dev = ensure_demo_data(tmp_path, train_rows=40, dev_rows=10, seed=1)
    assert (train, dev) == (tmp_path / "train.csv", tmp_path / "dev.csv")
    assert [r["dialogue"] for r in _read(train)] == [r["dialogue"] for r in generate_rows(40, 1)]
    assert len(_read(dev)) == 10

    # Same settings: the files are trusted as they are (a sentinel survives).
    train.write_text("fname,dialogue,summary\n", encoding="utf-8")
    ensure_demo_data(tmp_path, train_rows=40, dev_rows=10, seed=1)
    assert _read(train) == []

    for train_rows, seed in ((40, 2), (41, 2)):
        train.write_text("fname,dialogue,summary\n", encoding="utf-8")
        ensure_demo_data(tmp_path, train_rows=train_rows, dev_rows=10, seed=seed)
        assert len(_read(train)) == train_rows

    dev.unlink()
    ensure_demo_data(tmp_path, train_rows=41, dev_rows=10, seed=2)
    assert len(_read(dev)) == 10

    meta = json.loads((tmp_path / "meta.json").read_text(encoding="utf-8"))
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "version": -1}), encoding="utf-8")
    train.write_text("fname,dialogue,summary\n", encoding="utf-8")
    ensure_demo_data(tmp_path, train_rows=41, dev_rows=10, seed=2)
    assert len(_read(train)) == 41


def test_output_bytes_are_pinned(tmp_path):
    # Same seed must give byte-identical files on every machine and Python version; if the generator is
    # changed on purpose, bump GENERATOR_VERSION and update this digest.
    path = tmp_path / "golden.csv"
    write_csv(path, generate_rows(200, seed=0))
    assert synthetic.GENERATOR_VERSION == 1
    assert hashlib.sha256(path.read_bytes()).hexdigest() == GOLDEN_SHA256


def _json_sha256(value: object) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False).encode("utf-8")).hexdigest()


@pytest.mark.parametrize(("n", "seed", "prefix"), list(PINNED_ROWS))
def test_rows_templates_and_slots_are_pinned(n, seed, prefix):
    rows = generate_rows(n, seed, prefix)
    assert {
        "rows": _json_sha256(rows),
        "templates": _json_sha256([topic_template_summary(r) for r in rows]),
        "slots": _json_sha256([summary_slots(r["summary"]) for r in rows]),
    } == PINNED_ROWS[(n, seed, prefix)]


@pytest.mark.parametrize(("train_rows", "dev_rows"), list(PINNED_DEMO_CSV))
def test_demo_csv_bytes_are_pinned(tmp_path, train_rows, dev_rows):
    train, dev = ensure_demo_data(tmp_path, train_rows, dev_rows, seed=0)
    digests = tuple(hashlib.sha256(p.read_bytes()).hexdigest() for p in (train, dev))
    assert digests == PINNED_DEMO_CSV[(train_rows, dev_rows)]


def test_templates_file_loads_to_the_tables_in_use():
    text = (Path(synthetic.__file__).parent / "synthetic_templates.toml").read_text(encoding="utf-8")
    assert synthetic._load_tables(text) == synthetic._TABLES
    assert len(synthetic._TOPICS) == 15 and synthetic._KINDS["name"][0] == "김민수"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('name = "restaurant"', 'name = "restaurant', "line"),  # not TOML any more
        ('[[topic.beat]]\nrole = "c"', '[[topic.beat]]\nrole = "b"', r"topic\[0\]\.beat\[0\]\.role"),
        ("{restaurant:이죠}", "{restuarant:이죠}", r"topic\[0\] \(restaurant\).*\{restuarant:이죠\}"),
        ("{restaurant:이죠}", "{restaurant:죠}", r"unknown slot or particle in \{restaurant:죠\}"),
        ("summary = ", "sumary = ", r"topic\[0\]\.outcome\[0\] should be a table with keys"),
        ('slots = "name restaurant', 'slots = "name eatery', r"topic\[0\]\.slots uses unknown kinds \['eatery'\]"),
        ('say = ["네, {restaurant}입니다."', 'say = [3, "네, {restaurant}입니다."', r"intro\.say\[0\]"),
        ('["감사합니다.", ', '["감사합니다.", "", ', r"extras\.closings\[0\]\[1\] should be a non-empty string"),
    ],
)
def test_a_damaged_templates_file_is_refused_with_the_entry_named(old, new, message):
    text = (Path(synthetic.__file__).parent / "synthetic_templates.toml").read_text(encoding="utf-8")
    assert old in text
    with pytest.raises(ValueError, match=r"synthetic_templates\.toml is damaged: .*" + message):
        synthetic._load_tables(text.replace(old, new, 1))


def test_dev_rows_never_repeat_train_rows(tmp_path):
    train, dev = ensure_demo_data(tmp_path, train_rows=600, dev_rows=150, seed=0)
    train_rows, dev_rows = _read(train), _read(dev)
    assert len(dev_rows) == 150 and dev_rows[0]["fname"] == "dev_00000"
    seen = {r["dialogue"] for r in train_rows}
    assert not any(r["dialogue"] in seen for r in dev_rows)


def test_cli_prints_paths(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--train-rows", "5", "--dev-rows", "3", "--seed", "9"]
    assert synthetic.main(argv) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "train.csv"), str(tmp_path / "dev.csv")]
    with pytest.raises(UserError):
        synthetic.main(["--out", str(tmp_path), "--train-rows", "0"])
