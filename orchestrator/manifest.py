"""Song manifests: which songs a campaign trains, checked and cut into units of work.

A manifest is YAML::

    defaults:                     # optional, applies to every song
      split: train
      overrides: {specialist.total_steps: 2000000}
    songs:
      - path: songs/twinkle.mid   # relative paths resolve against the manifest's folder
        name: twinkle             # default: the file's stem
        split: train              # train | eval | held-out (default: train)
        overrides: {droq.batch_size: 128}   # dotted config keys, on top of the defaults
      - songs/nocturne.mid        # a bare path is a song with every default

or CSV (for long lists), a header ``path,name,split[,overrides]`` and one song per line (a
row may leave out trailing empty cells; a cell holding a comma is quoted, and a quote closes
on its own line); the ``overrides`` cell is a JSON object or ``key=value;key=value``. Lines
starting with ``#`` are comments (quote a path that begins with ``#``).

Parsing is strict and never stops at a bad entry: a row that is not CSV (an unclosed quote,
extra cells), a duplicate key or column, a wrong field, an unreadable MIDI or a bad override
is a :class:`Problem` (file, line, field or song, message) and only that entry is left out;
the other songs still load. :func:`parse_manifest` does the reading without loading MIDI. A song's identity is the sha256 of its MIDI bytes, so a song listed
twice (under any path) is kept once and the repeat is reported.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import configs
from workers.piano.music import ChunkPlan, Song, SongError, load_song, plan_chunks, song_limits
from workers.units import Split, UnitSpec
from configs.files import write_text_atomic

# The config sections that shape what a unit trains: they make up its config hash.
UNIT_SECTIONS = ("env", "droq", "specialist")


class ManifestError(ValueError):
    """The manifest file itself cannot be read (missing, or neither YAML nor CSV)."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest, located as precisely as the input allows."""

    file: str
    line: int | None
    message: str
    severity: Literal["error", "warning"] = "error"
    field: str | None = None
    song: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        what = " ".join(x for x in (f"[{self.song}]" if self.song else "", f"{self.field}:" if self.field else "") if x)
        return f"{where}: {self.severity}: {what + ' ' if what else ''}{self.message}"


class ManifestEntry(BaseModel):
    """One song as the manifest lists it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(min_length=1)
    name: str | None = None
    split: Split | None = None  # None: the manifest's default
    overrides: dict[str, Any] = Field(default_factory=dict)


class ManifestDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    split: Split = "train"
    overrides: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class ManifestSong:
    """A listed song that loaded: its entry, the Song, how it is cut, and its own config."""

    entry: ManifestEntry
    line: int
    path: Path  # resolved, absolute
    split: Split
    overrides: dict[str, Any]  # defaults' overrides merged with the entry's
    song: Song
    plan: ChunkPlan
    cfg: configs.Config  # the campaign config with this song's overrides applied
    config_hash: str  # cfg.hash(*UNIT_SECTIONS)

    @property
    def name(self) -> str:
        return self.song.name


@dataclass(eq=False)
class Manifest:
    path: Path
    songs: list[ManifestSong] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def units(self) -> list[UnitSpec]:
        """One unit per chunk with notes, in manifest order."""
        return [
            UnitSpec.create(song_path=str(s.path), song_hash=s.song.content_hash, song_name=s.name,
                            chunk_index=chunk.index, config_hash=s.config_hash, split=s.split,
                            overrides=s.overrides)
            for s in self.songs for chunk in s.plan.chunks
        ]


@dataclass
class _RawEntry:
    """An entry before validation: its data, its line, and the line of each of its fields."""

    data: Any
    line: int
    field_lines: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ListedSong:
    """An entry that parsed and validated, and where the manifest writes it."""

    entry: ManifestEntry
    line: int
    field_lines: dict[str, int]  # the line of each field (YAML); empty for a CSV row


def parse_manifest(path: str | Path, cfg: configs.Config, text: str | None = None
                   ) -> tuple[ManifestDefaults, list[ListedSong], list[Problem]]:
    """Read and validate a YAML or CSV manifest's entries, in file order, without loading a MIDI file.

    ``text`` (default: the file's content) is parsed as the file ``path``. Every entry either
    comes back or is named by an error :class:`Problem` at its line; only a manifest that
    cannot be read at all raises :class:`ManifestError`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".yaml", ".yml"):
        raise ManifestError(f"{path}: a manifest is a .yaml, .yml or .csv file")
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ManifestError(f"{path}: no such manifest") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ManifestError(f"{path}: cannot read the manifest ({e})") from None
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")  # a BOM; any line ends
    problems: list[Problem] = []
    if suffix == ".csv":
        defaults, raw = ManifestDefaults(), _read_csv(text, str(path), problems)
    else:
        defaults, raw = _read_yaml(text, str(path), problems, cfg)
    if not raw and not any(p.severity == "error" for p in problems):
        problems.append(Problem(str(path), None, "the manifest lists no songs"))
    listed = [song for item in raw if (song := _validate_entry(item, str(path), problems)) is not None]
    problems.sort(key=lambda p: p.line or 0)  # in file order
    return defaults, listed, problems


def _validate_entry(item: _RawEntry, file: str, problems: list[Problem]) -> ListedSong | None:
    def problem(message: str, name: str | None = None) -> None:
        problems.append(Problem(file, item.field_lines.get(name, item.line) if name else item.line, message, field=name))

    data = {"path": item.data} if isinstance(item.data, str) else item.data
    if not isinstance(data, dict):
        problem(f"expected a song (a mapping with 'path', or a path), got {type(data).__name__}")
        return None
    try:
        entry = ManifestEntry.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            name = str(err["loc"][0]) if err["loc"] else None
            if err["type"] == "extra_forbidden":
                problem(f"unknown field (expected one of: {', '.join(ManifestEntry.model_fields)})", name)
            else:
                problem(err["msg"], name)
        return None
    if "\x00" in entry.path:
        problem("a NUL character in the path", "path")
        return None
    if not _plain_size_within(entry.overrides):  # they become part of a unit's identity, as JSON
        problem(TOO_MANY_OVERRIDES, "overrides")
        return None
    return ListedSong(entry, item.line, item.field_lines)


# YAML aliases can make a few lines stand for billions of values, or for a value holding itself.
MAX_OVERRIDE_VALUES = 10_000
TOO_MANY_OVERRIDES = (f"overrides hold over {MAX_OVERRIDE_VALUES:,} values once YAML aliases are expanded "
                      "(or refer to themselves)")


def _plain_size_within(value: Any, limit: int = MAX_OVERRIDE_VALUES) -> bool:
    """Whether ``value`` written out (every alias expanded) holds at most ``limit`` values; stops counting there."""
    todo, n = [value], 0
    while todo:
        n += 1
        if n > limit:
            return False
        item = todo.pop()
        if isinstance(item, dict):
            todo += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple, set)):
            todo += item
    return True


def load_manifest(path: str | Path, cfg: configs.Config) -> Manifest:
    """Read, validate and load every song of a YAML or CSV manifest.

    Problems with single entries (a bad field, an unreadable MIDI, an unknown override key,
    a duplicate) are collected in ``Manifest.problems`` and the entry is skipped; only a
    manifest file that cannot be read at all raises :class:`ManifestError`.
    """
    path = Path(path)
    defaults, listed, problems = parse_manifest(path, cfg)
    manifest = Manifest(path=path, problems=problems)

    configs_by_overrides: dict[str, tuple[configs.Config, str]] = {}
    by_hash: dict[str, ManifestSong] = {}
    by_name: dict[str, ManifestSong] = {}
    for item in listed:
        loaded = _load_entry(item, defaults, manifest, cfg, configs_by_overrides)
        if loaded is None:
            continue
        first = by_hash.get(loaded.song.content_hash)
        if first is not None:
            same = (first.split, first.overrides) == (loaded.split, loaded.overrides)
            manifest.problems.append(Problem(
                str(path), item.line, severity="warning" if same else "error", song=loaded.name,
                message=f"same MIDI content as '{first.name}' (line {first.line})"
                        + ("; listed once" if same else " but a different split or overrides; only the first is kept")))
            continue
        if loaded.name in by_name:
            manifest.problems.append(Problem(
                str(path), item.line, severity="warning", song=loaded.name, field="name",
                message=f"name also used by line {by_name[loaded.name].line} for a different song"))
        by_hash[loaded.song.content_hash] = loaded
        by_name.setdefault(loaded.name, loaded)
        manifest.songs.append(loaded)
    manifest.problems.sort(key=lambda p: p.line or 0)  # in file order
    return manifest


def _load_entry(item: ListedSong, defaults: ManifestDefaults, manifest: Manifest, cfg: configs.Config,
                cache: dict[str, tuple[configs.Config, str]]) -> ManifestSong | None:
    file, entry = str(manifest.path), item.entry

    def problem(message: str, field: str | None = None, song: str | None = None, severity: str = "error") -> None:
        line = item.field_lines.get(field, item.line) if field else item.line
        manifest.problems.append(Problem(file, line, message, severity, field, song))

    song_path = Path(entry.path).expanduser()
    if not song_path.is_absolute():
        song_path = manifest.path.resolve().parent / song_path
    label = entry.name or song_path.stem
    overrides = {**defaults.overrides, **entry.overrides}
    key = json.dumps(overrides, sort_keys=True, default=str)
    if key not in cache:
        try:
            song_cfg = cfg.with_overrides(overrides) if overrides else cfg
        except configs.ConfigError as e:
            problem(" ".join(str(e).split()), "overrides", label)
            return None
        cache[key] = (song_cfg, song_cfg.hash(*UNIT_SECTIONS))
    song_cfg, config_hash = cache[key]
    for k in entry.overrides:
        if k.split(".")[0] not in UNIT_SECTIONS:
            problem(_not_per_song(k), "overrides", label, "warning")

    try:
        song = load_song(song_path, name=entry.name, limits=song_limits(song_cfg.manifest))
    except SongError as e:
        problem(str(e), "path", label)
        return None
    plan = plan_chunks(song, song_cfg.env)
    for fix in song.problems:
        problem(f"{song_path.name}: {fix}", song=song.name, severity="warning")
    if plan.skipped:
        problem(f"{song_path.name}: chunks {', '.join(map(str, plan.skipped))} of {plan.n_chunks} hold no notes; "
                "they are skipped", song=song.name, severity="warning")
    return ManifestSong(entry=entry, line=item.line, path=song_path, split=entry.split or defaults.split,
                        overrides=overrides, song=song, plan=plan, cfg=song_cfg, config_hash=config_hash)


def _not_per_song(key: str) -> str:
    return (f"'{key}' is not a per-song setting (only {', '.join(s + '.*' for s in UNIT_SECTIONS)} shape a unit); "
            "it does not change the unit's config hash")


# --------------------------------------------------------------------------- YAML


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _read_yaml(text: str, file: str, problems: list[Problem], cfg: configs.Config
               ) -> tuple[ManifestDefaults, list[_RawEntry]]:
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # refuses characters YAML does not allow
        root = loader.get_single_node()
    except yaml.reader.ReaderError as e:
        problems.append(Problem(file, text.count("\n", 0, e.position) + 1,
                                f"invalid YAML: the character U+{e.character:04X} is not allowed"))
        return ManifestDefaults(), []
    except (yaml.YAMLError, RecursionError, ValueError, OverflowError) as e:  # ValueError: "\U00110000"
        problems.append(_invalid_yaml(file, e, loader))
        return ManifestDefaults(), []

    def build(node: yaml.Node) -> tuple[bool, Any]:
        """The value of one part, built on its own: a value PyYAML cannot build is an error there alone."""
        try:
            return True, loader.construct_document(node)
        except (yaml.YAMLError, RecursionError, ValueError, OverflowError) as e:  # ValueError: a date 2024-13-01
            problems.append(_invalid_yaml(file, e, None, node))
            return False, None

    try:
        if isinstance(root, yaml.SequenceNode):  # a bare list of songs
            return ManifestDefaults(), _yaml_entries(root, build, file, problems)
        if not isinstance(root, yaml.MappingNode):
            problems.append(Problem(file, _line(root) if root else None,
                                    "expected a mapping with 'songs:' (and optionally 'defaults:')"))
            return ManifestDefaults(), []
        for key_node, first_line in _repeated_keys(root):
            problems.append(Problem(file, _line(key_node), f"'{key_node.value}' is also a key at line {first_line}; "
                                                           "each part is read, but write it once",
                                    field=str(key_node.value)))
        defaults, songs = ManifestDefaults(), []
        for key_node, value_node in root.value:
            key = key_node.value
            if key == "songs":
                if not isinstance(value_node, yaml.SequenceNode):
                    problems.append(Problem(file, _line(value_node), "expected a list of songs", field="songs"))
                    continue
                songs += _yaml_entries(value_node, build, file, problems)
            elif key == "defaults":
                built, data = build(value_node)
                if built:
                    defaults = _yaml_defaults(value_node, data, file, problems, cfg)
            else:
                problems.append(Problem(file, _line(key_node), "unknown top-level key (expected songs, defaults)",
                                        field=str(key)))
        return defaults, songs
    finally:
        loader.dispose()


def _invalid_yaml(file: str, e: BaseException, loader: yaml.SafeLoader | None, node: yaml.Node | None = None
                  ) -> Problem:
    if isinstance(e, RecursionError):
        what = "nested too deeply"
    else:
        what = " ".join(str(getattr(e, "problem", None) or e).split())
    mark = getattr(e, "problem_mark", None) or (node.start_mark if node is not None else None)
    if mark is None and loader is not None and not isinstance(e, RecursionError):
        mark = loader.get_mark()
    return Problem(file, mark.line + 1 if mark else None, f"invalid YAML: {what}")


def _yaml_defaults(node: yaml.Node, data: Any, file: str, problems: list[Problem],
                   cfg: configs.Config) -> ManifestDefaults:
    lines = _field_lines(node)
    repeated = _duplicate_keys(node)
    for key_node, first_line in repeated:
        problems.append(Problem(file, _line(key_node), f"'{key_node.value}' is also a key at line {first_line}; "
                                                       "the defaults are left out", field=f"defaults.{key_node.value}"))
    if repeated:
        return ManifestDefaults()
    try:
        defaults = ManifestDefaults.model_validate(data or {})
    except ValidationError as e:
        for err in e.errors():
            name = str(err["loc"][0]) if err["loc"] else None
            msg = "unknown field (expected split, overrides)" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(Problem(file, lines.get(name, _line(node)), msg,
                                    field=f"defaults.{name}" if name else "defaults"))
        return ManifestDefaults()
    if not _plain_size_within(defaults.overrides):
        problems.append(Problem(file, lines.get("overrides", _line(node)), TOO_MANY_OVERRIDES,
                                field="defaults.overrides"))
        return ManifestDefaults()
    try:  # checked once here rather than once per song
        cfg.with_overrides(defaults.overrides)
    except configs.ConfigError as e:
        problems.append(Problem(file, lines.get("overrides", _line(node)), " ".join(str(e).split()),
                                field="defaults.overrides"))
        defaults = defaults.model_copy(update={"overrides": {}})
    for k in defaults.overrides:
        if k.split(".")[0] not in UNIT_SECTIONS:
            problems.append(Problem(file, lines.get("overrides", _line(node)), _not_per_song(k), "warning",
                                    "defaults.overrides"))
    return defaults


def _repeated_keys(node: yaml.Node) -> list[tuple[yaml.ScalarNode, int]]:
    """The keys a mapping node writes again, each with the line of its first writing."""
    first: dict[str, int] = {}
    repeated = []
    for key, _ in node.value if isinstance(node, yaml.MappingNode) else ():
        if isinstance(key, yaml.ScalarNode):
            if key.value in first:
                repeated.append((key, first[key.value]))
            first.setdefault(key.value, _line(key))
    return repeated


def _duplicate_keys(root: yaml.Node) -> list[tuple[yaml.ScalarNode, int]]:
    """Every key written twice in one mapping anywhere under ``root`` (PyYAML keeps the last without a word)."""
    found, seen, todo = [], set(), [root]
    while todo:  # not recursive: the composer already accepted this depth
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        found += _repeated_keys(node)
        if isinstance(node, yaml.MappingNode):
            todo += [x for pair in node.value for x in pair]
        elif isinstance(node, yaml.SequenceNode):
            todo += node.value
    return sorted(found, key=lambda f: _line(f[0]))


def _field_lines(node: yaml.Node) -> dict[str, int]:
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): _line(k) for k, _ in node.value}


def _yaml_entries(seq: yaml.SequenceNode, build, file: str, problems: list[Problem]) -> list[_RawEntry]:
    entries = []
    for node in seq.value:
        repeated = _duplicate_keys(node)
        for key_node, first_line in repeated:
            problems.append(Problem(file, _line(key_node), f"'{key_node.value}' is also a key of this song at line "
                                                           f"{first_line}; the song is left out",
                                    field=str(key_node.value)))
        built, data = build(node)
        if built and not repeated:
            entries.append(_RawEntry(data, _line(node), _field_lines(node)))
    return entries


# --------------------------------------------------------------------------- CSV

CSV_COLUMNS = ("path", "name", "split", "overrides")


def _read_csv(text: str, file: str, problems: list[Problem]) -> list[_RawEntry]:
    """One row per line, read strictly: a line that is not one CSV row is an error at that line alone."""
    header, entries = None, []
    for line, row_text in enumerate(text.split("\n"), start=1):
        if not row_text.strip() or row_text.lstrip().startswith("#"):
            continue
        try:
            (row,) = csv.reader([row_text], strict=True)
        except csv.Error as e:
            hint = " (a quote left open? a quoted cell must close on its own line)" if "end of data" in str(e) else ""
            problems.append(Problem(file, line, f"not a CSV row: {e}{hint}"))
            if header is None:
                return []
            continue
        if not any(c.strip() for c in row):  # an empty row, as spreadsheets write them: ",,,"
            continue
        if header is None:
            header = [h.strip().lower() for h in row]
            for h in header:
                if h not in CSV_COLUMNS:
                    problems.append(Problem(file, line, f"unknown column '{h}' (expected {', '.join(CSV_COLUMNS)})",
                                            field=h))
            repeated = sorted({h for h in header if header.count(h) > 1})
            if repeated:
                problems.append(Problem(file, line, f"column {', '.join(map(repr, repeated))} named twice",
                                        field=repeated[0]))
            if "path" not in header or repeated:
                if "path" not in header:
                    problems.append(Problem(file, line, "the header needs a 'path' column", field="path"))
                return []
            continue
        if len(row) > len(header):
            problems.append(Problem(file, line, f"{len(row)} cells but the header names {len(header)} columns "
                                                "(a cell holding a comma must be quoted)"))
            continue
        cells = {h: c.strip() for h, c in zip(header, row) if h in CSV_COLUMNS and c.strip()}
        if "overrides" in cells:
            try:
                cells["overrides"] = _parse_override_cell(cells["overrides"])
            except ValueError as e:
                problems.append(Problem(file, line, str(e), field="overrides"))
                continue
        entries.append(_RawEntry(cells, line))
    return entries


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"overrides name '{key}' twice")
        out[key] = value
    return out


def _parse_override_cell(cell: str) -> dict[str, Any]:
    """``{"a.b": 1}`` (JSON) or ``a.b=1;c.d=true`` (values read as YAML scalars); a key named twice is an error."""
    if cell.startswith("{"):
        try:
            value = json.loads(cell, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            raise ValueError(f"overrides are not valid JSON ({e.msg})") from None
        except RecursionError:
            raise ValueError("overrides are nested too deeply") from None
        if not isinstance(value, dict):
            raise ValueError("overrides must be a JSON object")
        return value
    pairs = []
    for part in filter(None, (p.strip() for p in cell.split(";"))):
        if "=" not in part:
            raise ValueError(f"override '{part}': expected key=value (several separated by ';')")
        key, raw = part.split("=", 1)
        try:
            pairs.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
        except (yaml.YAMLError, RecursionError):
            raise ValueError(f"override '{part}': cannot read the value") from None
    return _unique_keys(pairs)


# --------------------------------------------------------------------------- demo


def demo_manifest(dest_dir: str | Path) -> Path:
    """Write ``dest_dir/demo.yaml`` naming RoboPianist's two bundled songs by absolute path.

    Twinkle Twinkle is a training song, the Nocturne is held out.
    """
    import robopianist  # heavy-ish import, only needed here

    data_dir = Path(robopianist.__file__).resolve().parent / "music" / "data" / "rousseau"
    manifest = {"songs": [
        {"path": str(data_dir / "twinkle-twinkle-trimmed.mid"), "name": "twinkle-twinkle", "split": "train"},
        {"path": str(data_dir / "nocturne-trimmed.mid"), "name": "nocturne", "split": "held-out"},
    ]}
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / "demo.yaml"
    text = "# The two songs bundled with RoboPianist.\n" + yaml.safe_dump(manifest, sort_keys=False)
    write_text_atomic(dest, text)
    return dest
