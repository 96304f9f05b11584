"""Tests for the synthetic DialogSum-style data generator."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import re

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
