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

or CSV (for long lists), a header ``path,name,split[,overrides]`` and one song per row; the
``overrides`` cell is a JSON object or ``key=value;key=value``. Lines starting with ``#``
are comments.

Loading never stops at a bad entry: a wrong field, an unreadable MIDI or a bad override is
a :class:`Problem` (file, line, field or song, message) and that entry is left out; the
other songs still load. A song's identity is the sha256 of its MIDI bytes, so a song listed
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


def load_manifest(path: str | Path, cfg: configs.Config) -> Manifest:
    """Read, validate and load every song of a YAML or CSV manifest.

    Problems with single entries (a bad field, an unreadable MIDI, an unknown override key,
    a duplicate) are collected in ``Manifest.problems`` and the entry is skipped; only a
    manifest file that cannot be read at all raises :class:`ManifestError`.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: cannot read the manifest ({e})") from None
    manifest = Manifest(path=path)
    if path.suffix.lower() == ".csv":
        defaults, raw = ManifestDefaults(), _read_csv(text, manifest)
    elif path.suffix.lower() in (".yaml", ".yml"):
        defaults, raw = _read_yaml(text, manifest, cfg)
    else:
        raise ManifestError(f"{path}: a manifest is a .yaml, .yml or .csv file")
    if not raw and not manifest.errors:
        manifest.problems.append(Problem(str(path), None, "the manifest lists no songs"))

    configs_by_overrides: dict[str, tuple[configs.Config, str]] = {}
    by_hash: dict[str, ManifestSong] = {}
    by_name: dict[str, ManifestSong] = {}
    for item in raw:
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


def _load_entry(item: _RawEntry, defaults: ManifestDefaults, manifest: Manifest, cfg: configs.Config,
                cache: dict[str, tuple[configs.Config, str]]) -> ManifestSong | None:
    file = str(manifest.path)

    def problem(message: str, field: str | None = None, song: str | None = None, severity: str = "error") -> None:
        line = item.field_lines.get(field, item.line) if field else item.line
        manifest.problems.append(Problem(file, line, message, severity, field, song))

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


def _read_yaml(text: str, manifest: Manifest, cfg: configs.Config) -> tuple[ManifestDefaults, list[_RawEntry]]:
    file = str(manifest.path)
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        manifest.problems.append(Problem(file, mark.line + 1 if mark else None, f"invalid YAML: {what}"))
        return ManifestDefaults(), []
    finally:
        loader.dispose()

    defaults = ManifestDefaults()
    if isinstance(root, yaml.SequenceNode):  # a bare list of songs
        return defaults, _yaml_entries(root, data)
    if not isinstance(root, yaml.MappingNode):
        manifest.problems.append(Problem(file, _line(root) if root else None,
                                         "expected a mapping with 'songs:' (and optionally 'defaults:')"))
        return defaults, []

    songs = []
    for key_node, value_node in root.value:
        key = key_node.value
        if key == "songs":
            if not isinstance(value_node, yaml.SequenceNode):
                manifest.problems.append(Problem(file, _line(value_node), "expected a list of songs", field="songs"))
                continue
            songs = _yaml_entries(value_node, data["songs"])
        elif key == "defaults":
            lines = _field_lines(value_node)
            try:
                defaults = ManifestDefaults.model_validate(data["defaults"] or {})
            except ValidationError as e:
                for err in e.errors():
                    name = str(err["loc"][0]) if err["loc"] else None
                    msg = "unknown field (expected split, overrides)" if err["type"] == "extra_forbidden" else err["msg"]
                    manifest.problems.append(Problem(file, lines.get(name, _line(value_node)), msg,
                                                     field=f"defaults.{name}" if name else "defaults"))
                continue
            try:  # checked once here rather than once per song
                cfg.with_overrides(defaults.overrides)
            except configs.ConfigError as e:
                manifest.problems.append(Problem(file, lines.get("overrides", _line(value_node)),
                                                 " ".join(str(e).split()), field="defaults.overrides"))
                defaults = defaults.model_copy(update={"overrides": {}})
            for k in defaults.overrides:
                if k.split(".")[0] not in UNIT_SECTIONS:
                    manifest.problems.append(Problem(file, lines.get("overrides", _line(value_node)),
                                                     _not_per_song(k), "warning", "defaults.overrides"))
        else:
            manifest.problems.append(Problem(file, _line(key_node), "unknown top-level key (expected songs, defaults)",
                                             field=str(key)))
    return defaults, songs


def _field_lines(node: yaml.Node) -> dict[str, int]:
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): _line(k) for k, _ in node.value}


def _yaml_entries(seq: yaml.SequenceNode, items: list) -> list[_RawEntry]:
    return [_RawEntry(data, _line(node), _field_lines(node)) for node, data in zip(seq.value, items)]


# --------------------------------------------------------------------------- CSV

CSV_COLUMNS = ("path", "name", "split", "overrides")


def _read_csv(text: str, manifest: Manifest) -> list[_RawEntry]:
    file = str(manifest.path)
    reader = csv.reader(io.StringIO(text))
    header, entries, last_line = None, [], 0
    for row in reader:
        line, last_line = last_line + 1, reader.line_num  # a quoted cell may span lines
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if header is None:
            header = [h.strip().lower() for h in row]
            for h in header:
                if h not in CSV_COLUMNS:
                    manifest.problems.append(Problem(file, line, f"unknown column '{h}' (expected {', '.join(CSV_COLUMNS)})",
                                                     field=h))
            if "path" not in header:
                manifest.problems.append(Problem(file, line, "the header needs a 'path' column", field="path"))
                return []
            continue
        if len(row) > len(header):
            manifest.problems.append(Problem(file, line, f"{len(row)} cells but the header names {len(header)} columns"))
            continue
        cells = {h: c.strip() for h, c in zip(header, row) if h in CSV_COLUMNS and c.strip()}
        if "overrides" in cells:
            try:
                cells["overrides"] = _parse_override_cell(cells["overrides"])
            except ValueError as e:
                manifest.problems.append(Problem(file, line, str(e), field="overrides"))
                continue
        entries.append(_RawEntry(cells, line))
    return entries


def _parse_override_cell(cell: str) -> dict[str, Any]:
    """``{"a.b": 1}`` (JSON) or ``a.b=1;c.d=true`` (values read as YAML scalars)."""
    if cell.startswith("{"):
        try:
            value = json.loads(cell)
        except json.JSONDecodeError as e:
            raise ValueError(f"overrides are not valid JSON ({e.msg})") from None
        if not isinstance(value, dict):
            raise ValueError("overrides must be a JSON object")
        return value
    out = {}
    for part in filter(None, (p.strip() for p in cell.split(";"))):
        if "=" not in part:
            raise ValueError(f"override '{part}': expected key=value (several separated by ';')")
        key, raw = part.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ValueError(f"override '{part}': cannot read the value") from None
    return out


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
