"""Property-based fuzzing (hypothesis) of what users hand in: CSV and YAML manifests, MIDI files.

No input may crash (only ManifestError / SongError, or a located Problem), hang, or lose an
entry without an error at its line. How many inputs a run tries: each test's ``max_examples``
below; ``--hypothesis-show-statistics`` prints the count per test.

    .venv/bin/python -m pytest tests/test_fuzz_inputs.py --hypothesis-show-statistics
"""

import csv
import io
import json
import re
import shutil
import struct
import tempfile
from pathlib import Path

import mido
import pytest
import yaml
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

import configs
from orchestrator.manifest import parse_manifest
from workers.piano.music import SongError, load_song, scan_midi, song_limits


def fuzz(max_examples: int):
    """A fixed number of inputs per test; no deadline (the machine may be loaded), no example database on disk."""
    return settings(max_examples=max_examples, deadline=None, database=None,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# Hypothesis's caches (unicode tables, source constants) in a temporary folder, not .hypothesis/ in the
# tree; set on import, as hypothesis fills them from the first test on.
HYPOTHESIS_HOME = Path(tempfile.mkdtemp(prefix="pianoforge-hypothesis-"))
set_hypothesis_home_dir(HYPOTHESIS_HOME)


@pytest.fixture(scope="module", autouse=True)
def hypothesis_home():
    yield
    set_hypothesis_home_dir(None)
    shutil.rmtree(HYPOTHESIS_HOME, ignore_errors=True)


@pytest.fixture(scope="module")
def cfg():
    return configs.load()


# --------------------------------------------------------------------------- manifests

# Any text a cell may hold: one line, no NUL, no surrounding blanks (cells are stripped).
cell_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\x00"), min_size=1,
                    max_size=20).map(str.strip).filter(bool)
override_value = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False), st.booleans(), cell_text)
entries = st.lists(st.fixed_dictionaries({
    "path": cell_text,
    "name": st.none() | cell_text,
    "split": st.none() | st.sampled_from(["train", "eval", "held-out"]),
    "overrides": st.dictionaries(st.from_regex(r"[a-z_]{1,8}\.[a-z_]{1,8}", fullmatch=True), override_value,
                                 max_size=3),
}), max_size=8)


def _csv(songs: list[dict], bom: bool, crlf: bool, comments: list[int]) -> tuple[str, dict[int, dict]]:
    """The songs as a spreadsheet would write them (a path starting with # quoted); their line numbers."""
    out, lines = io.StringIO(), {}
    plain = csv.writer(out, lineterminator="\n")
    quoted = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_ALL)
    plain.writerow(["path", "name", "split", "overrides"])
    line = 1
    for i, song in enumerate(songs):
        if i in comments:
            out.write("# a comment, \"with a quote\n\n")
            line += 2
        row = [song["path"], song["name"] or "", song["split"] or "",
               json.dumps(song["overrides"]) if song["overrides"] else ""]
        (quoted if song["path"].startswith("#") else plain).writerow(row)
        line += 1
        lines[line] = song
    text = out.getvalue()
    return ("\ufeff" if bom else "") + (text.replace("\n", "\r\n") if crlf else text), lines


def _as_listed(song: dict) -> dict:
    return {"path": song["path"], "name": song["name"], "split": song["split"], "overrides": song["overrides"]}


@fuzz(100)
@given(entries, st.booleans(), st.booleans(), st.sets(st.integers(0, 8)))
def test_a_csv_manifest_gives_back_exactly_its_songs(cfg, songs, bom, crlf, comments):
    text, lines = _csv(songs, bom, crlf, comments)
    _, listed, problems = parse_manifest("songs.csv", cfg, text=text)
    assert [p for p in problems if p.severity == "error" and p.message != "the manifest lists no songs"] == []
    assert [(s.line, s.entry.model_dump()) for s in listed] == [(line, _as_listed(s)) for line, s in lines.items()]


def _yaml(songs: list[dict]) -> str:
    items = [{k: v for k, v in song.items() if v} for song in songs]
    # Non-ASCII escaped: PyYAML's emitter writes some line breaks (U+0085) raw inside plain scalars.
    return yaml.safe_dump({"songs": [i["path"] if list(i) == ["path"] else i for i in items]}, width=float("inf"))


@fuzz(100)
@given(entries)
def test_a_yaml_manifest_gives_back_exactly_its_songs(cfg, songs):
    _, listed, problems = parse_manifest("songs.yaml", cfg, text=_yaml(songs))
    assert [p for p in problems if p.severity == "error" and p.message != "the manifest lists no songs"] == []
    assert [s.entry.model_dump() for s in listed] == [_as_listed(s) for s in songs]


hostile = st.sampled_from(list("\"',#{}[]:;=\\\n\t -&*!|>%@`\x00\ufeff\r")) | st.characters(blacklist_categories=("Cs",))


@st.composite
def mutated(draw, text: str) -> str:
    """``text`` with one to three characters inserted, replaced or deleted."""
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        how = draw(st.sampled_from(["insert", "replace", "delete"]))
        char = draw(hostile)
        text = text[:at] + (char if how != "delete" else "") + text[at + (how != "insert"):]
    return text


def _blank_row(line: str) -> bool:
    """A row of empty cells (",,,"), which holds no song."""
    try:
        return not any(c.strip() for row in csv.reader([line], strict=True) for c in row)
    except csv.Error:
        return False


@fuzz(150)
@given(st.data(), entries.filter(bool))
def test_a_damaged_csv_row_never_silently_loses_a_song(cfg, data, songs):
    clean, _ = _csv(songs, False, False, set())
    text = data.draw(mutated(clean))
    _, listed, problems = parse_manifest("songs.csv", cfg, text=text)  # raises nothing
    lines = text.replace("\r\n", "\n").replace("\r", "\n").removeprefix("\ufeff").split("\n")
    header = next((n for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")), None)
    errors = {p.line for p in problems if p.severity == "error"}
    if header in errors:
        return  # a damaged header is one located error
    listed_lines = {s.line for s in listed}
    for n, line in enumerate(lines, 1):
        if n > (header or 0) and line.strip() and not line.lstrip().startswith("#") and not _blank_row(line):
            assert n in listed_lines or n in errors, f"line {n} ({line!r}) neither read nor reported"
    # A row the damage did not touch reads as it did before.
    before = {s.line: s.entry for s in parse_manifest("songs.csv", cfg, text=clean)[1]}
    clean_lines = clean.split("\n")
    for s in listed:
        if lines[0] == clean_lines[0] and lines[s.line - 1] in clean_lines:
            assert s.entry == before[clean_lines.index(lines[s.line - 1]) + 1]


@fuzz(150)
@given(st.data(), entries.filter(bool))
def test_a_damaged_yaml_manifest_is_read_or_reported_without_crashing(cfg, data, songs):
    text = data.draw(mutated(_yaml(songs)))
    _, listed, problems = parse_manifest("songs.yaml", cfg, text=text)  # raises nothing
    n_lines = text.count("\n") + 2
    assert all(p.line is None or 1 <= p.line <= n_lines for p in problems)
    assert all(1 <= s.line <= n_lines for s in listed)


@fuzz(60)
@given(st.data(), entries.filter(bool))
def test_a_yaml_key_written_twice_is_an_error_at_its_line(cfg, data, songs):
    text = _yaml([{**s, "name": s["name"] or "x"} for s in songs])  # every song a mapping with two keys or more
    lines = text.split("\n")
    keys = [n for n, line in enumerate(lines) if line.startswith(("  ", "- ")) and not line.rstrip().endswith(":")]
    n = data.draw(st.sampled_from(keys))
    repeated = "  " + lines[n][2:] if lines[n].startswith("- ") else lines[n]  # the same key again, in the same mapping
    text = "\n".join(lines[:n + 1] + [repeated] + lines[n + 1:])
    _, listed, problems = parse_manifest("songs.yaml", cfg, text=text)
    assert n + 2 in {p.line for p in problems if p.severity == "error"}, (text, problems)
    assert len(listed) == len(songs) - 1  # that song alone is left out


# --------------------------------------------------------------------------- MIDI


@pytest.fixture(scope="module")
def midi_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-midi")


def _valid_midi() -> bytes:
    """A small file with most kinds of event: tempo on two tracks, running status, pedal, sysex, text, drums."""
    mid = mido.MidiFile(type=1, ticks_per_beat=480)
    mid.tracks.append(mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=400_000), mido.MetaMessage("text", text="x"),
                                      mido.Message("sysex", data=[1, 2, 3], time=10)]))
    notes = mido.MidiTrack([mido.Message("program_change", program=1), mido.Message("control_change", control=64, value=127)])
    for i in range(12):
        notes += [mido.Message("note_on", note=50 + i, velocity=70, time=60), mido.Message("note_on", note=50 + i, velocity=0, time=120),
                  mido.Message("note_on", channel=9, note=36, velocity=90), mido.Message("note_off", channel=9, note=36, time=5)]
    notes += [mido.MetaMessage("set_tempo", tempo=700_000, time=1), mido.Message("pitchwheel", pitch=100),
              mido.Message("control_change", control=64, value=0, time=30)]
    mid.tracks.append(notes)
    out = io.BytesIO()
    mid.save(file=out)
    return out.getvalue()


VALID_MIDI = _valid_midi()
SMALL_LIMITS = song_limits(configs.load(overrides=["manifest.max_midi_events=400", "manifest.max_song_notes=100",
                                                   "manifest.max_song_duration_s=600"]).manifest)


def _load(midi_dir: Path, data: bytes) -> str:
    """Load ``data``: read, or refused with a SongError naming the file (how, returned); anything else fails the test."""
    path = midi_dir / "fuzzed.mid"
    path.write_bytes(data)
    try:
        song = load_song(path, limits=SMALL_LIMITS)
    except SongError as e:
        assert str(e).startswith(str(path)), e
        return "refused: " + ("a limit" if "(manifest." in str(e) else "no playable notes" if "no playable" in str(e)
                              else "by mido" if re.search(r"MIDI file \(\w+(Error|Exception)\b", str(e)) else "by the scan")
    assert song.n_notes > 0 and (song.end > song.start).all() and song.duration <= SMALL_LIMITS.max_song_duration_s
    # The scan that bounded the cost counted exactly the messages mido went on to build.
    scan = scan_midi(data, path, SMALL_LIMITS)
    assert scan.n_events == sum(len(track) for track in mido.MidiFile(file=io.BytesIO(data)).tracks)
    return "read"


def test_the_valid_fuzz_seed_loads(midi_dir):
    assert _load(midi_dir, VALID_MIDI) == "read"


def _frame(header: bytes, bodies: list[bytes]) -> bytes:
    return header + b"".join(b"MTrk" + len(b).to_bytes(4, "big") + b for b in bodies)


# Event-like bytes: a delta time, a status byte (or none: running status), a few data bytes.
events = st.lists(st.tuples(st.sampled_from([b"\x00", b"\x10", b"\x81\x00", b"\xff\xff\xff\x7f", b"\x80\x80\x80\x80\x00"]),
                            st.sampled_from([b"", b"\x90", b"\x80", b"\xb0", b"\xc0", b"\xe0", b"\xf0", b"\xf7", b"\xf6",
                                             b"\xf8", b"\xf4", b"\xff\x51", b"\xff\x2f", b"\xff\x01"]),
                            st.sampled_from([b"\x3c\x40", b"\x3c\x00", b"\x40\x7f", b"\x03\x07\xa1\x20"]) | st.binary(max_size=4)
                            ).map(b"".join), max_size=30).map(b"".join)


@fuzz(300)
@given(st.integers(0, 3), st.integers(-1, 4), st.sampled_from([96, 480, 10_080, 0x7FFF, 0, -6360, -256]) | st.integers(-2**15, 2**15 - 1),
       st.lists(events | st.binary(max_size=100), min_size=1, max_size=3))
def test_random_tracks_are_read_or_refused(midi_dir, kind, n_tracks, division, bodies):
    """Random events (or bytes) in well-formed chunks, under a header of any type, track count and time division."""
    event(_load(midi_dir, _frame(b"MThd\x00\x00\x00\x06" + struct.pack(">hhh", kind, n_tracks, division), bodies)))


def _chunks(data: bytes) -> tuple[bytes, list[bytes]]:
    header, bodies, pos = data[:14], [], 14
    while pos < len(data):
        size = int.from_bytes(data[pos + 4:pos + 8], "big")
        bodies.append(data[pos + 8:pos + 8 + size])
        pos += 8 + size
    return header, bodies


@fuzz(400)
@given(st.data())
def test_a_damaged_midi_file_is_read_or_refused(midi_dir, data):
    """A valid file damaged in a track's events (its chunk length kept right or not), or anywhere in its bytes."""
    header, bodies = _chunks(VALID_MIDI)
    track = data.draw(st.integers(0, len(bodies) - 1))
    whole_file = data.draw(st.booleans())
    damaged = bytearray(VALID_MIDI if whole_file else bodies[track])
    for _ in range(data.draw(st.integers(1, 4))):
        if not damaged:
            break
        at = data.draw(st.integers(0, len(damaged) - 1))
        how = data.draw(st.sampled_from(["flip", "byte", "insert", "delete", "truncate", "repeat"]))
        if how == "flip":
            damaged[at] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "byte":
            damaged[at] = data.draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0xF0, 0xF7, 0x90, 0xB0, 0x51]))
        elif how == "insert":
            damaged[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif how == "delete":
            del damaged[at:at + data.draw(st.integers(1, 8))]
        elif how == "truncate":
            del damaged[at:]
        else:
            damaged[at:at] = damaged[at:at + data.draw(st.integers(1, 40))] * data.draw(st.integers(1, 50))
    if not whole_file:
        damaged = _frame(header, bodies[:track] + [bytes(damaged)] + bodies[track + 1:])
    event(_load(midi_dir, bytes(damaged)))
