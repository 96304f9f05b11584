"""Deterministic synthetic Korean dialogue→summary data in DialogSum CSV form, for the offline demo and tests.

Each example picks a topic, draws slot values (names, dates, times, prices, ...) from fixed lists, renders a
dialogue from several phrasings per turn (plus optional small talk, closings and a third speaker) and renders
the summary from a per-outcome template. Summary slot values always appear verbatim in the dialogue, so the
summary is learnable, and every summary carries at least two of them, so a topic template alone scores low.

`topic_template_summary` recovers the template of any summary (also one read back from CSV) by matching it
against the summary templates, whose slots only accept values from the slot lists, and re-renders it with one
fixed placeholder per slot kind.

The templates and slot values are data in loop/synthetic_templates.toml, loaded and checked at import; this
module holds the rules that combine them.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from loop.errors import ArgumentParser, UserError, run_cli

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Bump whenever the output for a given seed changes, so ensure_demo_data regenerates stale files.
GENERATOR_VERSION = 1

SPEAKER_TOKENS: tuple[str, ...] = ("#Person1#", "#Person2#", "#Person3#")
MASK_TOKENS: tuple[str, ...] = (
    "#PhoneNumber#",
    "#Address#",
    "#PersonName#",
    "#Email#",
    "#DateOfBirth#",
    "#CarNumber#",
    "#CardNumber#",
)
COLUMNS: tuple[str, ...] = ("fname", "dialogue", "summary")


# The templates and slot values are data, kept in this package file (shipped via pyproject's package-data).
_TEMPLATES_FILE = "synthetic_templates.toml"

# Particles that depend on whether the host word ends in a consonant: key -> (after consonant, after vowel).
_JOSA: dict[str, tuple[str, str]] = {
    "은": ("은", "는"),
    "이": ("이", "가"),
    "을": ("을", "를"),
    "과": ("과", "와"),
    "으로": ("으로", "로"),
    "이에요": ("이에요", "예요"),
    "이라고": ("이라고", "라고"),
    "이라는": ("이라는", "라는"),
    "이라": ("이라", "라"),
    "이다": ("이다", "다"),
    "이죠": ("이죠", "죠"),
}
# Speaker tokens are read 퍼슨원/퍼슨투/퍼슨쓰리, which decides their particles.
_SPEAKER_LAST_SYLLABLE = {"#Person1#": "원", "#Person2#": "투", "#Person3#": "리"}

_SLOT_RE = re.compile(r"\{(\w+)(?::(\w+))?\}")
_MAX_TURNS = 10
# Roles: "c" is the caller/customer/initiator, "a" the other party; both render as speaker tokens.
_ROLES = ("c", "a")

_Beat = tuple[str, tuple[str, ...]]  # (role, phrasings)


@dataclass(frozen=True)
class _Outcome:
    summary: str
    beats: tuple[_Beat, ...]


@dataclass(frozen=True)
class _Topic:
    name: str
    slots: tuple[tuple[str, str], ...]  # (slot, kind)
    intro: _Beat | None  # optional first turn; its speaker then becomes #Person1#
    beats: tuple[_Beat, ...]
    outcomes: tuple[_Outcome, ...]
    casual: bool = False  # friends talking: banmal small talk and no service-desk closing


@dataclass(frozen=True)
class _Tables:
    kinds: dict[str, tuple[str, ...]]  # slot kind -> values; the first value is the kind's placeholder
    topics: tuple[_Topic, ...]
    small_talk: tuple[tuple[str, str], ...]
    casual_small_talk: tuple[tuple[str, str], ...]
    closings: tuple[tuple[str, str], ...]  # spoken by "c" then "a"
    third_speaker: tuple[str, ...]


def _slots(spec: str) -> tuple[tuple[str, str], ...]:
    """Parse "slot:kind slot2:kind ..." (a bare "kind" names a slot after its kind)."""
    return tuple((s.split(":")[0], s.split(":")[-1]) for s in spec.split())


# Kinds built by rule from [parts] (products of short lists, hundreds of values each); every other kind is
# listed value by value in [kinds].
_BUILT_KINDS = frozenset({"name", "date", "item"})


# The loader checks the file's shape so that a damaged package file fails at import and names the bad entry,
# rather than raising a KeyError only when some phrasing happens to be drawn.
def _damaged(problem: str) -> ValueError:
    return ValueError(f"loop/{_TEMPLATES_FILE} is damaged: {problem}")


def _table(value: object, where: str, keys: set[str], optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    # Unknown keys are refused too, so a misspelled key cannot silently drop its entries.
    if not (isinstance(value, dict) and keys <= value.keys() <= keys | optional):
        allowed = f"{sorted(keys)}, optionally {sorted(optional)}" if optional else f"{sorted(keys)}"
        raise _damaged(f"{where} should be a table with keys {allowed}")
    return value


def _array(value: object, where: str) -> list[Any]:
    if not (isinstance(value, list) and value):
        raise _damaged(f"{where} should be a non-empty array")
    return value


def _string(value: object, where: str) -> str:
    if not (isinstance(value, str) and value):
        raise _damaged(f"{where} should be a non-empty string")
    return value


def _strings(value: object, where: str) -> tuple[str, ...]:
    return tuple(_string(v, f"{where}[{i}]") for i, v in enumerate(_array(value, where)))


def _pairs(value: object, where: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for i, item in enumerate(_array(value, where)):
        pair = _strings(item, f"{where}[{i}]")
        if len(pair) != 2:
            raise _damaged(f"{where}[{i}] should be a [line, reply] pair")
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def _beat(value: object, where: str) -> _Beat:
    table = _table(value, where, {"role", "say"})
    if table["role"] not in _ROLES:
        raise _damaged(f"{where}.role should be one of {list(_ROLES)}")
    return table["role"], _strings(table["say"], f"{where}.say")


def _beats(value: object, where: str) -> tuple[_Beat, ...]:
    return tuple(_beat(item, f"{where}[{i}]") for i, item in enumerate(_array(value, where)))


def _topic(value: object, where: str, kinds: dict[str, tuple[str, ...]]) -> _Topic:
    table = _table(value, where, {"name", "slots", "beat", "outcome"}, frozenset({"intro", "casual"}))
    outcomes = []
    for i, item in enumerate(_array(table["outcome"], f"{where}.outcome")):
        outcome = _table(item, f"{where}.outcome[{i}]", {"summary", "beat"})
        summary = _string(outcome["summary"], f"{where}.outcome[{i}].summary")
        outcomes.append(_Outcome(summary, _beats(outcome["beat"], f"{where}.outcome[{i}].beat")))
    if not isinstance(table.get("casual", False), bool):
        raise _damaged(f"{where}.casual should be true or false")
    topic = _Topic(
        name=_string(table["name"], f"{where}.name"),
        slots=_slots(_string(table["slots"], f"{where}.slots")),
        intro=_beat(table["intro"], f"{where}.intro") if "intro" in table else None,
        beats=_beats(table["beat"], f"{where}.beat"),
        outcomes=tuple(outcomes),
        casual=table.get("casual", False),
    )
    unknown = [kind for _, kind in topic.slots if kind not in kinds]
    if unknown:
        raise _damaged(f"{where}.slots uses unknown kinds {unknown}")
    # Every {slot:josa} must name one of the topic's slots (or a role) and a known particle.
    names = {slot for slot, _ in topic.slots} | set(_ROLES)
    beats = [*([topic.intro] if topic.intro else []), *topic.beats, *(b for o in outcomes for b in o.beats)]
    for text in [o.summary for o in outcomes] + [p for _, phrasings in beats for p in phrasings]:
        for m in _SLOT_RE.finditer(text):
            if m.group(1) not in names or m.group(2) not in (None, *_JOSA):
                raise _damaged(f"{where} ({topic.name}) has an unknown slot or particle in {m.group(0)}")
    return topic


def _load_tables(text: str) -> _Tables:
    """Parse and check the templates file's text."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise _damaged(str(err)) from err
    doc = _table(doc, "the file", {"parts", "kinds", "topic", "extras"})
    names = ("surnames", "given_names", "colors", "goods")
    parts = _table(doc["parts"], "[parts]", set(names))
    surnames, given, colors, goods = (_strings(parts[k], f"parts.{k}") for k in names)
    listed = doc["kinds"]
    if not isinstance(listed, dict) or _BUILT_KINDS & listed.keys():
        raise _damaged(f"[kinds] should be a table of value arrays, without the built kinds {sorted(_BUILT_KINDS)}")
    kinds = {
        "name": tuple(s + g for g in given for s in surnames),
        "date": tuple(f"{m}월 {d}일" for m in range(1, 13) for d in range(1, 29)),
        "item": tuple(f"{c} {g}" for g in goods for c in colors),
        **{kind: _strings(values, f"kinds.{kind}") for kind, values in listed.items()},
    }
    extras = _table(doc["extras"], "[extras]", {"small_talk", "casual_small_talk", "closings", "third_speaker"})
    return _Tables(
        kinds=kinds,
        topics=tuple(_topic(t, f"topic[{i}]", kinds) for i, t in enumerate(_array(doc["topic"], "[[topic]]"))),
        small_talk=_pairs(extras["small_talk"], "extras.small_talk"),
        casual_small_talk=_pairs(extras["casual_small_talk"], "extras.casual_small_talk"),
        closings=_pairs(extras["closings"], "extras.closings"),
        third_speaker=_strings(extras["third_speaker"], "extras.third_speaker"),
    )


_TABLES = _load_tables(resources.files("loop").joinpath(_TEMPLATES_FILE).read_text(encoding="utf-8"))
_KINDS, _TOPICS = _TABLES.kinds, _TABLES.topics
_SMALL_TALK, _CASUAL_SMALL_TALK = _TABLES.small_talk, _TABLES.casual_small_talk
_CLOSINGS, _THIRD_SPEAKER = _TABLES.closings, _TABLES.third_speaker


def _ends_with_consonant(word: str, josa: str) -> bool:
    last = _SPEAKER_LAST_SYLLABLE.get(word, word[-1])
    if not "가" <= last <= "힣":
        raise ValueError(f"cannot choose a particle after {word!r}")
    final = (ord(last) - ord("가")) % 28
    # 으로 takes 로 after a vowel and after ㄹ (final consonant index 8).
    return final not in (0, 8) if josa == "으로" else final != 0


def _attach(word: str, josa: str | None) -> str:
    if josa is None:
        return word
    hard, soft = _JOSA[josa]
    return word + (hard if _ends_with_consonant(word, josa) else soft)


def _render(template: str, values: dict[str, str]) -> str:
    return _SLOT_RE.sub(lambda m: _attach(values[m.group(1)], m.group(2)), template)


def _template_slots(template: str) -> list[str]:
    return [m.group(1) for m in _SLOT_RE.finditer(template) if m.group(1) not in _ROLES]


def _summary_pattern(topic: _Topic, template: str) -> re.Pattern[str]:
    kinds = dict(topic.slots)
    seen: set[str] = set()
    parts: list[str] = []
    pos = 0
    for m in _SLOT_RE.finditer(template):
        parts.append(re.escape(template[pos : m.start()]))
        slot, josa = m.group(1), m.group(2)
        if slot in seen:
            parts.append(f"(?P={slot})")
        else:
            seen.add(slot)
            options = SPEAKER_TOKENS if slot in _ROLES else _KINDS[kinds[slot]]
            alternatives = "|".join(re.escape(v) for v in sorted(options, key=len, reverse=True))
            parts.append(f"(?P<{slot}>{alternatives})")
        if josa is not None:
            parts.append("(?:" + "|".join(_JOSA[josa]) + ")")
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts))


_SUMMARY_PATTERNS: tuple[tuple[_Topic, str, re.Pattern[str]], ...] = tuple(
    (topic, outcome.summary, _summary_pattern(topic, outcome.summary))
    for topic in _TOPICS
    for outcome in topic.outcomes
)


def _pick(rng: random.Random, beat: _Beat, values: dict[str, str]) -> tuple[str, str]:
    role, phrasings = beat
    return role, _render(rng.choice(phrasings), values)


def _make_example(rng: random.Random) -> tuple[str, str, dict[str, str]]:
    """Draw one example: (dialogue, summary, the slot values the summary uses)."""
    topic = rng.choice(_TOPICS)
    values: dict[str, str] = {}
    for slot, kind in topic.slots:
        taken = list(values.values())
        values[slot] = rng.choice([v for v in _KINDS[kind] if v not in taken])
    outcome = rng.choice(topic.outcomes)

    turns: list[tuple[str, str]] = []
    if topic.intro is not None and rng.random() < 0.5:
        turns.append(_pick(rng, topic.intro, values))
    first_role = turns[0][0] if turns else topic.beats[0][0]
    roles = {first_role: SPEAKER_TOKENS[0], ("a" if first_role == "c" else "c"): SPEAKER_TOKENS[1]}
    values.update({"c": roles["c"], "a": roles["a"]})
    turns.extend(_pick(rng, beat, values) for beat in (*topic.beats, *outcome.beats))

    # Extras never push a dialogue past _MAX_TURNS, which keeps sequences short for fast CPU training.
    # After a statement (not a question) a small-talk pair reads naturally and keeps speakers alternating.
    after_statement = [i + 1 for i, (_, text) in enumerate(turns[:-1]) if not text.endswith("?")]
    if after_statement and len(turns) + 2 <= _MAX_TURNS and rng.random() < 0.4:
        at = rng.choice(after_statement)
        nxt = turns[at][0]
        opener, reply = rng.choice(_CASUAL_SMALL_TALK if topic.casual else _SMALL_TALK)
        turns[at:at] = [(nxt, opener), ("a" if nxt == "c" else "c", reply)]
    if not topic.casual and turns[-1][0] == "a" and len(turns) + 2 <= _MAX_TURNS and rng.random() < 0.5:
        thanks, goodbye = rng.choice(_CLOSINGS)
        turns.extend([("c", thanks), ("a", goodbye)])

    lines = [f"{roles[role]}: {text}" for role, text in turns]
    if len(lines) < _MAX_TURNS and rng.random() < 0.1:
        lines.insert(rng.randint(2, len(lines) - 1), f"{SPEAKER_TOKENS[2]}: {rng.choice(_THIRD_SPEAKER)}")

    summary = _render(outcome.summary, values)
    used = {slot: values[slot] for slot in _template_slots(outcome.summary)}
    return "\n".join(lines), summary, used


def _examples(seed: int | str) -> Iterator[tuple[str, str, dict[str, str]]]:
    rng = random.Random(seed)
    while True:
        yield _make_example(rng)


def _rows_from(
    examples: Iterator[tuple[str, str, dict[str, str]]],
    n: int,
    prefix: str,
    exclude: frozenset[str] = frozenset(),
) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        dialogue, summary, _slots = next(examples)
        if dialogue not in exclude:
            rows.append({"fname": f"{prefix}_{len(rows):05d}", "dialogue": dialogue, "summary": summary})
    return rows


def generate_rows(n: int, seed: int, prefix: str = "train") -> list[dict[str, str]]:
    """Return `n` synthetic rows (fname, dialogue, summary); the same seed always gives the same rows."""
    if n < 0:
        raise UserError(f"row count must be >= 0, got {n}")
    return _rows_from(_examples(seed), n, prefix)


def summary_slots(summary: str) -> tuple[str, dict[str, str]]:
    """Return (topic name, slot values) of a generated summary, found by matching the summary templates."""
    for topic, _template, pattern in _SUMMARY_PATTERNS:
        m = pattern.fullmatch(summary)
        if m is not None:
            return topic.name, {k: v for k, v in m.groupdict().items() if k not in _ROLES}
    raise ValueError(f"not a synthetic summary: {summary!r}")


def topic_template_summary(row: dict[str, str]) -> str:
    """Return the row's summary with every slot value replaced by its kind's placeholder (speakers kept)."""
    for topic, template, pattern in _SUMMARY_PATTERNS:
        m = pattern.fullmatch(row["summary"])
        if m is not None:
            kinds = dict(topic.slots)
            values = {slot: _KINDS[kind][0] for slot, kind in kinds.items()}
            values.update({role: m.group(role) for role in _ROLES if role in pattern.groupindex})
            return _render(template, values)
    raise ValueError(f"not a synthetic summary: {row['summary']!r}")


def _atomic_write_text(path: Path, write: Callable[[TextIO], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_csv(path: Path | str, rows: Sequence[dict[str, str]]) -> None:
    """Write rows as a UTF-8 DialogSum CSV (fname,dialogue,summary), atomically via a temp file."""

    def write(f: TextIO) -> None:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: row[k] for k in COLUMNS} for row in rows)

    _atomic_write_text(Path(path), write)


def ensure_demo_data(out_dir: Path | str, train_rows: int, dev_rows: int, seed: int) -> tuple[Path, Path]:
    """Write train.csv/dev.csv under out_dir unless meta.json says they already match these settings."""
    out = Path(out_dir)
    train_path, dev_path, meta_path = out / "train.csv", out / "dev.csv", out / "meta.json"
    meta = {"version": GENERATOR_VERSION, "train_rows": train_rows, "dev_rows": dev_rows, "seed": seed}
    try:
        current = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        current = None
    if current == meta and train_path.is_file() and dev_path.is_file():
        return train_path, dev_path

    train = generate_rows(train_rows, seed, "train")
    # A separate stream for dev; a dev dialogue that happens to equal a train one is skipped.
    dev = _rows_from(_examples(f"{seed}:dev"), dev_rows, "dev", frozenset(r["dialogue"] for r in train))
    # The old sidecar goes first and the new one last, so an interrupted run leaves no meta vouching for
    # files it did not finish.
    meta_path.unlink(missing_ok=True)
    write_csv(train_path, train)
    write_csv(dev_path, dev)
    _atomic_write_text(meta_path, lambda f: f.write(json.dumps(meta, indent=2) + "\n"))
    return train_path, dev_path


def main(argv: list[str] | None = None) -> int:
    """CLI: write the synthetic train/dev CSVs and print their paths."""
    parser = ArgumentParser(prog="python -m loop.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--train-rows", type=int, default=3000)
    parser.add_argument("--dev-rows", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.train_rows < 1 or args.dev_rows < 1:
        raise UserError("--train-rows and --dev-rows must be >= 1")
    for path in ensure_demo_data(args.out, args.train_rows, args.dev_rows, args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
