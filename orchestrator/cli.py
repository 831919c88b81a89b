"""The ``pianoforge`` command line. Each command is a thin layer over a library function."""

from __future__ import annotations

from contextlib import contextmanager
from enum import IntEnum
from importlib.metadata import version as _version
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from configs.files import disk_full, write_text_atomic

class _FlagsShowNoValue:
    """A flag's help shows no value type (typer would write ``--watch <bool>`` as if it took one)."""

    def format_help(self, ctx, formatter):
        for param in self.get_params(ctx):
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return super().format_help(ctx, formatter)


class _Command(_FlagsShowNoValue, TyperCommand):
    """Usage lines as click writes them: a required argument NAME, an optional one [NAME]
    (typer would write ``{name}``)."""

    def collect_usage_pieces(self, ctx):
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = (param.metavar or param.name).upper()
                pieces.append((name if param.required else f"[{name}]") + ("..." if param.nargs != 1 else ""))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


class _Group(_FlagsShowNoValue, TyperGroup):
    pass


class _Typer(typer.Typer):
    """``typer.Typer`` whose commands and groups write their usage and help as above."""

    def __init__(self, **kwargs):
        super().__init__(cls=_Group, **kwargs)

    def command(self, *args, **kwargs):
        return super().command(*args, cls=kwargs.pop("cls", _Command), **kwargs)


app = _Typer(
    name="pianoforge",
    help="Train robot pianists at scale: specialists per song chunk, a trajectory lake, a generalist.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
manifest_app = _Typer(help="Song manifests: check what a manifest will train.", no_args_is_help=True)
app.add_typer(manifest_app, name="manifest")


class ExitCode(IntEnum):
    """Exit status of every command (the table in docs/faults.md): one meaning each, the
    same error the same status in every command."""

    OK = 0
    FAILED = 1  # it ran and found or left failures: units failed, damaged shards, manifest errors, records undelivered
    BAD_INPUT = 2  # a bad option, --set, config, or a missing or unusable file, campaign, unit or lake: nothing ran
    REJECTED = 3  # the campaign ran, but manifest entries were rejected (`--allow-errors`: 0)
    NODE_FAULT = 4  # the driver stopped on a fault of this machine (disk full); `resume` continues
    INTERRUPTED = 130


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@contextmanager
def _fail_with(code: int, *errors: type[BaseException]):
    """A command's expected errors end it with one ``error: ...`` line on stderr and exit status ``code``."""
    try:
        yield
    except errors as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code) from None


def _version_cb(value: bool) -> None:
    if value:
        typer.echo(f"pianoforge {_version('pianoforge')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version_cb, is_eager=True, help="Print the version."),
) -> None:
    pass


@manifest_app.command("check")
def manifest_check(
    file: str = typer.Argument(..., metavar="FILE", help="Manifest (.yaml or .csv)."),
    profile: str = typer.Option("local", "--profile", help="Config profile (configs/profiles/NAME.yaml)."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Config override, e.g. env.chunk_steps=300 (repeatable)."),
) -> None:
    """Load every song of a manifest, show how it is cut into units, and list the problems (exit 1 on errors).

    duration is the song as played: stretched by env.stretch_factor, silence trimmed.
    """
    from rich.console import Console
    from rich.table import Table

    import configs
    from orchestrator.manifest import ManifestError, load_manifest

    with _fail_with(ExitCode.BAD_INPUT, configs.ConfigError, ManifestError):
        cfg = configs.load(profile=profile, overrides=overrides)
        manifest = load_manifest(file, cfg)

    console = Console(width=max(Console().width, 120))
    console.print(f"{file}: {len(manifest.songs)} songs, {len(manifest.units())} units", markup=False,
                  highlight=False, soft_wrap=True)
    table = Table()
    for column, justify in [("song", "left"), ("split", "left"), ("hash", "left"), ("chunks", "right"),
                            ("skipped", "right"), ("notes", "right"), ("duration", "right")]:
        table.add_column(column, justify=justify)
    for s in manifest.songs:
        table.add_row(s.name, s.split, s.song.content_hash[:12], str(len(s.plan.chunks)), str(len(s.plan.skipped)),
                      str(s.song.n_notes), _hms(s.plan.n_steps * s.cfg.env.control_timestep))
    table.add_section()
    table.add_row("total", "", "", str(sum(len(s.plan.chunks) for s in manifest.songs)),
                  str(sum(len(s.plan.skipped) for s in manifest.songs)), str(sum(s.song.n_notes for s in manifest.songs)),
                  _hms(sum(s.plan.n_steps * s.cfg.env.control_timestep for s in manifest.songs)), style="bold")
    console.print(table)
    for problem in manifest.problems:
        console.print(str(problem), markup=False, highlight=False, soft_wrap=True,
                      style="red" if problem.severity == "error" else "yellow")
    n_err, n_warn = len(manifest.errors), len(manifest.warnings)
    console.print(f"{_plural(n_err, 'error')}, {_plural(n_warn, 'warning')}", highlight=False)
    raise typer.Exit(ExitCode.FAILED if n_err else ExitCode.OK)


def _hms(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}" if minutes >= 60 else f"{minutes}:{s:02d}"


# ---- campaigns: submit, resume, status, demo ------------------------------------------------

# The demo's tiny budgets: a few hundred training steps and 2 rollouts per unit.


def _load_config(profile: str, sets: list[str], workload: Optional[str]):
    import configs

    overrides = list(sets) + ([f"campaign.workload={workload}"] if workload else [])
    with _fail_with(ExitCode.BAD_INPUT, configs.ConfigError):
        return configs.load(profile=profile, overrides=overrides)


def _drive_with_progress(run, total: int):
    """Run ``run(on_progress)`` under a progress bar of finished units; returns its summary."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("units"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task("", total=total)

        def on_progress(counts: dict[str, int]) -> None:
            done = counts["succeeded"] + counts["gated"] + counts["failed"]
            bar.update(task, completed=done, total=sum(counts.values()),
                       description=f"running {counts['running']}  failed {counts['failed']}")

        return run(on_progress)


def _report_summary(summary, rejected: int = 0) -> None:
    """Print where the campaign stands and exit 0 (all finished), 1 (units failed), 3 (``rejected``
    manifest entries), 4 (stopped on a node fault) or 130 (interrupted)."""
    from rich.console import Console

    from orchestrator.status import read_status, render

    import dataclasses

    Console().print(render(dataclasses.replace(read_status(summary.dir), driver="stopped")))  # its stop may be unrecorded (disk full)
    from orchestrator.tracking import mlflow_ui_hint

    typer.echo(f"this run: {summary.attempts_run} attempts in {summary.seconds:.1f} s; MLflow: "
               f"{mlflow_ui_hint(summary.tracking_uri)}")
    if summary.tracking_behind:
        typer.echo(f"warning: {summary.tracking_behind}", err=True)
    if summary.no_space is not None:
        _exit_no_space(summary.no_space, summary.dir)
    if summary.interrupted:
        raise typer.Exit(ExitCode.INTERRUPTED)
    if summary.counts.get("failed"):
        typer.echo(f"{_plural(summary.counts['failed'], 'unit')} failed; `{_resume_command(summary.dir)}` retries them",
                   err=True)
        raise typer.Exit(ExitCode.FAILED)
    if rejected:
        typer.echo(f"{rejected} manifest entries were rejected (errors above) and dropped from the campaign; "
                   "exit status 3 (--allow-errors: 0)", err=True)
        raise typer.Exit(ExitCode.REJECTED)


def _root_option(root: Path) -> str:
    """`` --root ROOT`` unless ``root`` is the default campaign root (as resolved from here)."""
    import configs

    return "" if Path(root).resolve() == Path(configs.load(profile=None).campaign.root).resolve() else f" --root {root}"


def _resume_command(campaign_dir: Path) -> str:
    return f"pianoforge resume {campaign_dir.name}{_root_option(campaign_dir.parent)}"


def _exit_no_space(no_space, campaign_dir: Path):
    """The one message of a driver stopped by a full disk, then exit 4."""
    typer.echo(f"error: disk full: no space left on device at {no_space.filename or 'the campaign directory'}. "
               f"The campaign stopped cleanly: what was written is intact and no unit lost an attempt. "
               f"Free some space, then `{_resume_command(campaign_dir)}` continues.", err=True)
    raise typer.Exit(ExitCode.NODE_FAULT)


@contextmanager
def _driving(campaign_dir: Path, *usage_errors: type[BaseException]):
    """Around a driver run: ``usage_errors`` exit 2 with their message; a full disk before the
    driver could stop cleanly gets the same one message as one it stopped on (exit 4)."""
    with _fail_with(ExitCode.BAD_INPUT, *usage_errors):
        try:
            yield
        except usage_errors:
            raise
        except Exception as e:  # noqa: BLE001 - only a full disk is turned into a message
            no_space = disk_full(e)
            if no_space is None:
                raise
            _exit_no_space(no_space, campaign_dir)


def _manifest_or_exit(path, cfg):
    """The loaded manifest, its problems printed to stderr; exit 2 if the file itself is unusable."""
    from orchestrator.manifest import ManifestError, load_manifest

    with _fail_with(ExitCode.BAD_INPUT, ManifestError):
        manifest = load_manifest(path, cfg)
    for problem in manifest.problems:
        typer.echo(str(problem), err=True)
    return manifest


def _submit_manifest(manifest, campaign, profile, ray_address, root, sets, workload, allow_errors: bool = False):
    """Load, submit and drive ``manifest``; print the summary and return it (exits on errors;
    entries the manifest rejected make it exit 3 at the end unless ``allow_errors``)."""
    from orchestrator import campaign as campaign_mod

    cfg = _load_config(profile, sets, workload)
    loaded = _manifest_or_exit(manifest, cfg)
    units = loaded.units()
    if not units:
        typer.echo(f"error: {manifest}: no units to train", err=True)
        raise typer.Exit(ExitCode.BAD_INPUT)
    name = campaign or Path(manifest).stem
    rejected = len(loaded.errors)
    dropped = f", {rejected} manifest entries dropped (errors above)" if rejected else ""
    typer.echo(f"campaign {name}: {len(loaded.songs)} songs, {len(units)} units, workload {cfg.campaign.workload}{dropped}")
    with _driving(Path(root or cfg.campaign.root) / name, campaign_mod.CampaignError):
        summary = _drive_with_progress(
            lambda cb: campaign_mod.submit(units, cfg, name, root=root, ray_address=ray_address, on_progress=cb),
            total=len(units))
    _report_summary(summary, rejected=0 if allow_errors else rejected)
    return summary


@app.command()
def submit(
    manifest: Path = typer.Argument(..., exists=True, dir_okay=False, help="Song manifest (YAML or CSV)."),
    campaign: Optional[str] = typer.Option(None, "--campaign", help="Campaign name (default: the manifest's file name)."),
    profile: str = typer.Option("local", "--profile", help="Config profile: local or slurm."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to join (default: start Ray in this process)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder of campaign directories (default: campaign.root)."),
    sets: list[str] = typer.Option([], "--set", help="Config override key=value (repeatable), e.g. specialist.total_steps=1000."),
    workload: Optional[str] = typer.Option(None, "--workload", help="specialist (default) or synthetic (no physics, for drills)."),
    allow_errors: bool = typer.Option(False, "--allow-errors", help="Exit 0 even when manifest entries were rejected."),
) -> None:
    """Train every unit (song chunk x config) of a manifest; submitting it again continues the campaign.

    Exit status: 0 all units finished; 1 units failed (`resume` retries them); 2 bad options,
    config or manifest file (nothing ran); 3 the valid entries trained but some were rejected
    (0 with --allow-errors); 4 the driver stopped on a full disk (`resume` continues); 130 interrupted.
    """
    _submit_manifest(manifest, campaign, profile, ray_address, root, sets, workload, allow_errors)


@app.command()
def resume(
    campaign: str = typer.Argument(..., help="Campaign name under --root."),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder of campaign directories (default: campaign.root)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to join (default: start Ray in this process)."),
    sets: list[str] = typer.Option([], "--set", help="Override key=value of the driver's settings (campaign.*, mlflow.*, gate.*, il.*, slurm.*, ray.*); units keep their config."),
) -> None:
    """Restart failed units (attempts reset to 0) and interrupted units from their checkpoints."""
    import configs
    from orchestrator import campaign as campaign_mod
    from orchestrator.store import CampaignStore

    root = root or Path(_load_config("local", [], None).campaign.root)
    with _driving(Path(root) / campaign, campaign_mod.CampaignError, configs.ConfigError):
        paths = campaign_mod.CampaignPaths.of(root, campaign)
        db = paths.db
        if not db.exists():
            raise campaign_mod.CampaignError(f"no campaign {campaign!r} under {db.parent.parent} (no {db.name})")
        campaign_mod.load_saved_config(paths, sets)  # bad overrides fail here, before anything starts
        with CampaignStore(db, readonly=True) as store:
            total = sum(store.counts().values())
        summary = _drive_with_progress(
            lambda cb: campaign_mod.resume(campaign, root=root, overrides=sets, ray_address=ray_address, on_progress=cb),
            total=total)
    _report_summary(summary)


@app.command()
def status(
    campaign: Optional[str] = typer.Argument(None, help="Campaign name under --root, or its directory (default: the latest)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder of campaign directories (default: campaign.root)."),
    watch: bool = typer.Option(False, "--watch", help="Refresh live until Ctrl-C."),
    interval: float = typer.Option(2.0, "--interval", help="Seconds between refreshes with --watch."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as one JSON object (for scripts)."),
) -> None:
    """Units by state, F1 histogram, throughput, ETA and last errors (reads the store; safe while it runs)."""
    import time as _time

    from rich.console import Console
    from rich.live import Live

    from orchestrator.status import read_status, render, resolve_campaign

    root = root or Path(_load_config("local", [], None).campaign.root)
    with _fail_with(ExitCode.BAD_INPUT, FileNotFoundError):
        directory = resolve_campaign(campaign, root)
    behind = _sync_tracking(directory, timeout_s=STATUS_SYNC_S, quiet=as_json)
    if as_json:
        import dataclasses
        import json

        shown = {**dataclasses.asdict(read_status(directory)), "tracking_behind": behind}
        typer.echo(json.dumps(shown, default=str, indent=2))
        return
    if not watch:
        Console().print(render(read_status(directory)))
        return
    with Live(render(read_status(directory)), refresh_per_second=4) as live:
        try:
            while True:
                _time.sleep(interval)
                live.update(render(read_status(directory)))
        except KeyboardInterrupt:
            pass


STATUS_SYNC_S = 5.0  # how long `status` spends delivering MLflow records a stopped driver left


def _sync_tracking(directory: Path, timeout_s: float | None, quiet: bool = False) -> str | None:
    """Deliver the campaign's waiting MLflow records. Returns the warning line when some are left
    (also printed to stderr unless ``quiet``), else None."""
    from orchestrator.tracking import sync, sync_hint

    try:
        done = sync(directory, timeout_s)
    except Exception as e:  # noqa: BLE001 - tracking never stops a command that reads the campaign
        line = f"MLflow outbox of {directory}: {type(e).__name__}: {e}"
    else:
        if done is None or done[0].empty:
            return None
        line = done[0].describe(done[1], sync_hint(directory.name))
    if not quiet:
        typer.echo(f"warning: {line}", err=True)
    return line


mlflow_app = _Typer(help="MLflow tracking: deliver what the tracking server has not received yet.",
                         no_args_is_help=True)
app.add_typer(mlflow_app, name="mlflow")


@mlflow_app.command("sync")
def mlflow_sync(
    campaign: Optional[str] = typer.Argument(None, help="Campaign name under --root, or a directory holding "
                                                        "mlflow-outbox.db (default: the latest campaign)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder of campaign directories (default: campaign.root)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Give up after this many seconds (default: "
                                                                    "until delivered or the server fails)."),
) -> None:
    """Deliver the MLflow records a campaign keeps while the tracking server is unreachable (exit 1 if some are left)."""
    from orchestrator.status import resolve_campaign
    from workers.tracking import OUTBOX_FILE

    root = root or Path(_load_config("local", [], None).campaign.root)
    directory = Path(campaign).expanduser() if campaign and (Path(campaign) / OUTBOX_FILE).exists() else None
    if directory is None:
        with _fail_with(ExitCode.BAD_INPUT, FileNotFoundError):
            directory = resolve_campaign(campaign, root)
    if _sync_tracking(directory.resolve(), timeout):
        raise typer.Exit(ExitCode.FAILED)
    typer.echo(f"{directory}: every MLflow record delivered")


@app.command()
def demo(
    root: Optional[Path] = typer.Option(None, "--root", help="Folder of campaign directories (default: campaign.root)."),
    campaign: str = typer.Option("demo", "--campaign", help="Campaign name."),
    sets: list[str] = typer.Option([], "--set", help="More config overrides key=value, on top of the demo's tiny budgets."),
    workload: Optional[str] = typer.Option(None, "--workload", help="specialist (default) or synthetic."),
) -> None:
    """The whole pipeline in a few minutes: specialists with tiny budgets on RoboPianist's two bundled
    songs, the F1 gate (lowered), imitation learning on the lake, evaluation on a seen and a held-out song."""
    import time as _time

    import yaml

    from orchestrator.manifest import demo_manifest
    from orchestrator.tracking import mlflow_ui_hint

    t0 = _time.perf_counter()
    cfg = _load_config("demo", list(sets), workload)
    root = Path(root or cfg.campaign.root).resolve()
    manifest = demo_manifest(root / campaign / "manifest")
    typer.echo(f"demo gate lowered to {cfg.gate.f1_threshold} (F1) and {cfg.gate.min_shards} shard "
               "so the imitation step runs (tiny specialists reach F1 ~0.02; the real gate is 0.75)")
    summary = _submit_manifest(manifest, campaign, "demo", None, root, list(sets), workload)
    job = summary.imitation
    if job is None or job["state"] != "succeeded":
        typer.echo(f"error: the imitation step did not succeed: {job and job['error'] or 'not launched'}", err=True)
        raise typer.Exit(ExitCode.FAILED)
    loss = f"{job['loss']:.4g}" if job.get("loss") is not None else "-"
    typer.echo(f"imitation: {job['policy']} policy after {job['steps']} steps (loss {loss}) -> {job['policy_path']}")

    from workers.imitation.evaluate import evaluate_policy, log_to_mlflow, print_table, summarize, write_csv

    max_steps = cfg.il.eval_max_steps or None
    songs = yaml.safe_load(manifest.read_text())["songs"]
    typer.echo(f"evaluating on {', '.join(s['name'] for s in songs)} ({max_steps or 'all'} steps per chunk)...")
    rows = summarize(evaluate_policy(job["policy_path"], [s["path"] for s in songs], cfg,
                                     song_names=[s["name"] for s in songs], max_steps=max_steps))
    print_table(rows)
    table = write_csv(rows, Path(job["out_dir"]) / "eval.csv")
    try:
        run_id = log_to_mlflow(rows, summary.tracking_uri, summary.name, run_name="eval-demo",
                               params={"policy": job["policy_path"], "max_steps": max_steps or 0})
    except Exception as e:  # noqa: BLE001 - the table is written; MLflow is a view of it
        typer.echo(f"warning: evaluation not logged to MLflow ({summary.tracking_uri}): {e}", err=True)
    else:
        from orchestrator.gate import record_evaluation
        from orchestrator.store import CampaignStore

        with CampaignStore(summary.dir / "campaign.db") as store:  # the dashboard finds it there
            record_evaluation(store, job["out_dir"], run_id)
    root_opt = _root_option(root)
    typer.echo(f"\ndemo done in {_time.perf_counter() - t0:.0f} s. Where everything is:\n"
               f"  campaign    {summary.dir}  (store, units/, lake/, il/, logs/)\n"
               f"  policy      {job['policy_path']}\n"
               f"  evaluation  {table}\n"
               f"  status      pianoforge status {summary.name}{root_opt}\n"
               f"  dashboard   pianoforge dashboard {summary.name}{root_opt}\n"
               f"  MLflow      {mlflow_ui_hint(summary.tracking_uri)}")


# --- slurm: the campaign head as a SLURM job ----------------------------------------------------
slurm_app = _Typer(help="SLURM: run the campaign head as a SLURM job.", no_args_is_help=True)
app.add_typer(slurm_app, name="slurm")


@slurm_app.command("head-sbatch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def slurm_head_sbatch(
    ctx: typer.Context,
    out: Path = typer.Option(Path("head.sbatch"), "--out", help="Where to write the sbatch script."),
    partition: Optional[str] = typer.Option(None, "--partition", help="Partition of the head job (default: SLURM's)."),
    cpus: int = typer.Option(2, "--cpus", help="CPUs of the head job (the driver and the Ray head)."),
    mem_gb: float = typer.Option(8, "--mem-gb", help="Memory of the head job."),
    time_min: int = typer.Option(1440, "--time-min", help="Time limit of the head job in minutes."),
    token_file: str = typer.Option("~/.ray/auth_token", "--token-file",
                                   help="Ray auth token file, created if absent; pool jobs must be able to read it."),
    log_dir: Path = typer.Option(Path("logs"), "--log-dir", help="Folder of the head job's output."),
    profile: str = typer.Option("slurm", "--profile", help="Config profile for the head's settings."),
    submit_now: bool = typer.Option(False, "--submit", help="Also submit it with sbatch."),
) -> None:
    """Write an sbatch script that starts a Ray head and runs COMMAND (after --) next to it.

    e.g. pianoforge slurm head-sbatch --submit -- pianoforge submit songs.yaml --profile slurm
    """
    import subprocess

    from slurm.head import render_head_sbatch

    if not ctx.args:
        typer.echo("error: give the command to run next to the head after --", err=True)
        raise typer.Exit(ExitCode.BAD_INPUT)
    log_dir.mkdir(parents=True, exist_ok=True)
    text = render_head_sbatch(list(ctx.args), token_file=str(Path(token_file).expanduser()),
                              log_dir=str(log_dir.resolve()), partition=partition, cpus=cpus, mem_gb=mem_gb,
                              time_min=time_min, profile=profile)
    write_text_atomic(out, text)
    typer.echo(f"wrote {out}")
    if submit_now:
        subprocess.run(["sbatch", str(out)], check=True)
# --- end slurm -----------------------------------------------------------------------------------


# --- specialist: train one unit alone ------------------------------------------------------------
@app.command()
def specialist(
    song: Path = typer.Option(..., "--song", exists=True, dir_okay=False, metavar="FILE", help="MIDI file."),
    chunk: int = typer.Option(0, "--chunk", min=0, metavar="K", help="Chunk index (env.chunk_steps steps each)."),
    out: Path = typer.Option(..., "--out", metavar="DIR", help="Unit directory: checkpoint, result.json, metrics.jsonl."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, metavar="N", help="Training env steps (specialist.total_steps)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", min=0, metavar="N", help="Random warm-up steps (droq.warmup_steps)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", min=1, metavar="N", help="specialist.eval_interval."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", min=1, metavar="N",
                                                   help="specialist.checkpoint_interval."),
    rollouts: Optional[int] = typer.Option(None, "--rollouts", min=0, metavar="N", help="Rollouts recorded into the lake."),
    lake: Optional[Path] = typer.Option(None, "--lake", metavar="DIR", help="Lake root (default: DIR/lake)."),
    profile: str = typer.Option("local", "--profile", help="Config profile (configs/profiles/NAME.yaml)."),
    sets: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Config override, e.g. droq.batch_size=64 (repeatable)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Train one specialist on one chunk of one song, commit its rollouts, print the result.

    Running the same command again resumes from DIR/checkpoint.pt, or prints the saved result
    when the unit is done. e.g. a one-minute smoke run:
    pianoforge specialist --song twinkle.mid --out /tmp/unit --steps 300 --warmup 100 --rollouts 2
    --set droq.batch_size=64 --set env.chunk_steps=100
    """
    import contextlib
    import json
    import sys

    import configs
    from workers.units import UnitSpec

    # stdout carries only the result JSON: libraries that print while loading (pyfluidsynth
    # does when CI is set) go to stderr with the progress.
    with contextlib.redirect_stdout(sys.stderr):
        from orchestrator.manifest import UNIT_SECTIONS
        from workers.piano.music import SongError, load_song, plan_chunks
        from workers.rl.pack import train_unit

    budget = {"specialist.total_steps": steps, "droq.warmup_steps": warmup, "specialist.eval_interval": eval_every,
              "specialist.checkpoint_interval": checkpoint_every, "specialist.rollouts": rollouts}
    overrides = list(sets) + [f"{k}={v}" for k, v in budget.items() if v is not None]
    try:
        cfg = configs.load(profile=profile, overrides=overrides)
        loaded = load_song(song)
        plan_chunks(loaded, cfg.env).chunk(chunk)  # fail early on a chunk the song does not have
    except (configs.ConfigError, SongError) as e:
        where = "" if str(song) in str(e) or isinstance(e, configs.ConfigError) else f"{song}: "
        typer.echo(f"error: {where}{e}", err=True)
        raise typer.Exit(ExitCode.BAD_INPUT) from None
    unit = UnitSpec.create(song_path=str(song.resolve()), song_hash=loaded.content_hash, song_name=loaded.name,
                           chunk_index=chunk, config_hash=cfg.hash(*UNIT_SECTIONS))
    out.mkdir(parents=True, exist_ok=True)
    from orchestrator.playback import write_unit_file

    write_unit_file(out, unit, cfg, lake or out / "lake")  # what render, play and export-policy read
    metrics_log = open(out / "metrics.jsonl", "a")  # append-only log of every report

    def report(metrics: dict) -> None:
        metrics_log.write(json.dumps(metrics) + "\n")
        metrics_log.flush()
        if any(k.startswith(("eval/", "resume/", "rollout/")) for k in metrics):
            shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            typer.echo(shown, err=True)

    try:
        with contextlib.redirect_stdout(sys.stderr):
            result = train_unit(unit, cfg, out, lake or out / "lake", report=report, progress=not no_progress)
    except SongError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(ExitCode.BAD_INPUT) from None
    finally:
        metrics_log.close()
    typer.echo(result.model_dump_json(indent=2))


# ---- watching and sharing policies: render, play, export-policy ---------------------------------
def _unit_or_exit(unit_dir: Path):
    from orchestrator.playback import UnitNotFound, resolve_unit

    with _fail_with(ExitCode.BAD_INPUT, UnitNotFound):
        return resolve_unit(unit_dir)


def _render_failed(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(ExitCode.FAILED) from None


@app.command()
def render(
    unit_dir: Optional[Path] = typer.Argument(None, metavar="UNIT_DIR", help="Unit directory (campaign's units/<id>, or specialist --out)."),
    out: Path = typer.Option(..., "--out", metavar="FILE.mp4", help="Video to write: .mp4, .mov, .mkv, .webm, .avi "
                             "(the container follows the extension), or .png for one still."),
    seed: Optional[int] = typer.Option(None, "--seed", help="The recorded rollout with this seed (default: the best one)."),
    policy: Optional[Path] = typer.Option(None, "--policy", exists=True, metavar="FILE",
                                          help="Play this policy instead (export-policy or train-il output); needs --song."),
    song: Optional[Path] = typer.Option(None, "--song", exists=True, dir_okay=False, metavar="MIDI", help="Song for --policy."),
    chunk: int = typer.Option(0, "--chunk", min=0, metavar="K", help="Chunk of --song."),
    width: int = typer.Option(640, "--width", min=16, help="Video width in pixels (even)."),
    height: int = typer.Option(480, "--height", min=16, help="Video height in pixels (even)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Only the first N control steps."),
    quality: str = typer.Option("fast", "--quality", help="fast (no shadows or reflections) or full."),
    profile: str = typer.Option("local", "--profile", help="Config profile (for --policy without UNIT_DIR)."),
    sets: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Config override (for --policy without UNIT_DIR)."),
) -> None:
    """Write a video with sound of a unit's best recorded rollout (replayed from the lake), or of a policy playing a song chunk."""
    from workers.piano.music import SongError
    from workers.piano.render import RenderError, render_rollout

    try:
        if policy is not None:
            if song is None:
                typer.echo("error: --policy needs --song (and --chunk)", err=True)
                raise typer.Exit(ExitCode.BAD_INPUT)
            from workers.piano.music import load_song

            cfg = _unit_or_exit(unit_dir).cfg if unit_dir else _load_config(profile, sets, None)
            result = render_rollout(song, chunk, cfg.env, out, policy=policy, seed=seed or 0, width=width, height=height,
                                    max_steps=max_steps, soundfont=cfg.dashboard.soundfont,
                                    song_hash=load_song(song).content_hash, quality=quality, progress=True)
        elif unit_dir is None:
            typer.echo("error: give UNIT_DIR, or --policy with --song", err=True)
            raise typer.Exit(ExitCode.BAD_INPUT)
        else:
            from orchestrator.playback import render_unit
            from workers.lake import LakeError

            view = _unit_or_exit(unit_dir)
            try:
                result = render_unit(view, out, seed=seed, width=width, height=height, max_steps=max_steps,
                                     soundfont=view.cfg.dashboard.soundfont, quality=quality, progress=True)
            except LakeError as e:
                _render_failed(e)
    except (RenderError, SongError, ValueError) as e:
        _render_failed(e)
    typer.echo(f"wrote {result.path}: {result.frames} frames {result.width}x{result.height} at {result.fps} fps "
               f"({result.steps} steps, seed {result.seed}, F1 {result.f1:.3f}, OpenGL {result.gl})")


@app.command()
def play(
    target: Path = typer.Argument(..., exists=True, metavar="UNIT_DIR|POLICY",
                                  help="A unit directory (its specialist) or a policy file (export-policy or train-il)."),
    song: Optional[Path] = typer.Option(None, "--song", exists=True, dir_okay=False, metavar="MIDI",
                                        help="Song to play (default: the unit's)."),
    chunk: Optional[int] = typer.Option(None, "--chunk", min=0, metavar="K", help="Chunk of the song (default: the unit's, else 0)."),
    episodes: int = typer.Option(1, "--episodes", min=1, help="Episodes to play (seeds SEED, SEED+1, ...)."),
    seed: int = typer.Option(0, "--seed", help="First episode's seed."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Only the first N control steps."),
    render_to: Optional[Path] = typer.Option(None, "--render", metavar="FILE.mp4", help="Also write a video of the first episode."),
    width: int = typer.Option(640, "--width", min=16, help="--render: video width in pixels (even)."),
    height: int = typer.Option(480, "--height", min=16, help="--render: video height in pixels (even)."),
    profile: str = typer.Option("local", "--profile", help="Config profile (for a policy file)."),
    sets: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Config override (for a policy file)."),
) -> None:
    """Play a specialist or an imitation policy on a song chunk in the environment; print precision, recall and F1."""
    import tempfile

    import numpy as np
    import torch

    from workers.imitation.evaluate import rollout
    from workers.imitation.export import SpecialistPolicy, load_any_policy, save_state
    from workers.piano.env import make_env
    from workers.piano.music import SongError, load_chunk, load_song
    from workers.piano.render import RenderError, render_rollout

    with tempfile.TemporaryDirectory(prefix="pianoforge-play-") as tmp:
        if target.is_dir() and not (target / "policy.pt").exists():
            from orchestrator.playback import UnitNotFound, specialist_policy_state

            view = _unit_or_exit(target)
            cfg = view.cfg
            with _fail_with(ExitCode.BAD_INPUT, UnitNotFound):
                state = specialist_policy_state(view)
            policy_file = save_state(state, Path(tmp) / "policy.pt")
            policy = SpecialistPolicy(state).eval()
            song_path = song or Path(view.spec.song_path)
            chunk = view.spec.chunk_index if chunk is None and song is None else (chunk or 0)
        else:
            cfg = _load_config(profile, sets, None)
            policy_file = target
            with _fail_with(ExitCode.BAD_INPUT, ValueError, FileNotFoundError):
                policy = load_any_policy(target)
            if song is None:
                typer.echo("error: a policy file needs --song", err=True)
                raise typer.Exit(ExitCode.BAD_INPUT)
            song_path, chunk = song, chunk or 0
        with _fail_with(ExitCode.BAD_INPUT, SongError):
            loaded = load_song(song_path)
            midi = load_chunk(song_path, chunk, cfg.env, expected_hash=loaded.content_hash)
        env = make_env(midi, cfg.env, seed=seed)
        rows = []
        try:
            for i in range(episodes):
                torch.manual_seed(seed + i)
                metrics, steps, _ = rollout(policy, env, replan_every=policy.horizon, max_steps=max_steps, seed=seed + i)
                rows.append(metrics)
                typer.echo(f"episode {i} (seed {seed + i}): {steps} steps  precision {metrics['precision']:.3f}  "
                           f"recall {metrics['recall']:.3f}  F1 {metrics['f1']:.3f}")
        finally:
            env.close()
        typer.echo(f"{loaded.name} chunk {chunk}: mean F1 {np.mean([r['f1'] for r in rows]):.3f} over {episodes} episode(s)")
        if render_to is not None:
            try:
                result = render_rollout(song_path, chunk, cfg.env, render_to, policy=policy_file, seed=seed,
                                        width=width, height=height, max_steps=max_steps, soundfont=cfg.dashboard.soundfont,
                                        song_hash=loaded.content_hash)
            except RenderError as e:
                _render_failed(e)
            typer.echo(f"wrote {result.path}: {result.frames} frames {result.width}x{result.height} (F1 {result.f1:.3f})")


@app.command("export-policy")
def export_policy(
    unit_dir: Path = typer.Argument(..., metavar="UNIT_DIR", help="Unit directory of a trained specialist."),
    out: Path = typer.Option(..., "--out", metavar="FILE.pt", help="Policy file to write (plain tensors, weights_only)."),
) -> None:
    """Write a specialist's policy on its own: plain tensors that load with torch.load(weights_only=True) (see docs/research.md)."""
    from orchestrator.playback import UnitNotFound, specialist_policy_state
    from workers.imitation.export import save_state

    view = _unit_or_exit(unit_dir)
    with _fail_with(ExitCode.BAD_INPUT, UnitNotFound):
        state = specialist_policy_state(view)
    save_state(state, out)
    done = "" if state["meta"]["done"] else " (the unit has not finished training: this is its latest checkpoint)"
    typer.echo(f"wrote {out}: specialist of unit {view.spec.unit_id} at step {state['meta']['step']}{done}")


# ---- the trajectory lake --------------------------------------------------------------------
lake_app = _Typer(help="The trajectory lake: list and verify committed shards, clean up after crashed writers.",
                       no_args_is_help=True)
app.add_typer(lake_app, name="lake")


@lake_app.command("list")
def lake_list(
    root: Path = typer.Argument(..., metavar="LAKE", help="Lake root (e.g. CAMPAIGN_DIR/lake)."),
    min_f1: Optional[float] = typer.Option(None, "--min-f1", help="Only shards with specialist F1 >= this."),
    split: Optional[str] = typer.Option(None, "--split", help="Only this split (train, eval, held-out)."),
) -> None:
    """List the committed shards of a lake, one line each, and the totals; a shard whose file is
    not the one its catalog entry records (size and sha256) is marked DAMAGED (exit 1 when there is one)."""
    from workers.lake import Lake, LakeError

    lake = _lake_or_exit(root)
    with _fail_with(ExitCode.BAD_INPUT, LakeError):
        shards = lake.shards(min_f1=min_f1, split=split)
    _print_shards(root, [(s, lake.shard_problem(s)) for s in shards])


def _lake_or_exit(root: Path):
    """The lake at ``root``; exit 2 naming the path when it is not one (no ``meta/info.json``)."""
    from workers.lake import Lake

    lake = Lake(root)
    if not lake.info_path.is_file():
        typer.echo(f"error: {root}: not a trajectory lake (no {lake.info_path.relative_to(lake.root)})", err=True)
        raise typer.Exit(ExitCode.BAD_INPUT)
    return lake


def _print_shards(root: Path, checked: list) -> None:
    """A table of (shard, problem) rows with totals; damaged ones named below it, then exit 1 if any."""
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for column, justify in [("unit", "left"), ("song", "left"), ("chunk", "right"), ("split", "left"),
                            ("F1", "right"), ("episodes", "right"), ("steps", "right"), ("MB", "right"),
                            ("health", "left")]:
        table.add_column(column, justify=justify)
    for s, problem in checked:
        table.add_row(s.unit_id, s.song_name, str(s.chunk_index), s.split, f"{s.specialist_f1:.3f}",
                      str(s.n_episodes), str(s.n_steps), f"{s.bytes / 1e6:.1f}", "DAMAGED" if problem else "ok",
                      style="red" if problem else None)
    shards = [s for s, _ in checked]
    damaged = [(s, problem) for s, problem in checked if problem]
    table.add_section()
    table.add_row(f"{len(shards)} shards", "", "", "", "", str(sum(s.n_episodes for s in shards)),
                  str(sum(s.n_steps for s in shards)), f"{sum(s.bytes for s in shards) / 1e6:.1f}",
                  f"{len(damaged)} damaged", style="bold")
    Console(width=200).print(table)
    for s, problem in damaged:
        typer.echo(f"damaged: {s.path}: {problem}", err=True)
    if damaged:
        typer.echo(f"{len(damaged)} damaged shard(s) in {root}: the gate and the dataset reader leave them out; "
                   "`pianoforge resume CAMPAIGN` records their units' rollouts again", err=True)
        raise typer.Exit(ExitCode.FAILED)


@lake_app.command("verify")
def lake_verify(
    root: Path = typer.Argument(..., exists=True, file_okay=False, metavar="LAKE", help="Lake root (e.g. CAMPAIGN_DIR/lake)."),
) -> None:
    """Check every committed shard against its catalog entry: size and sha256 (reads every byte).

    Entries catalogued before checksums were kept get theirs when the file reads whole.
    Exit 1 when a shard is damaged.
    """
    from workers.lake import Lake, LakeError

    lake = _lake_or_exit(root)
    with _fail_with(ExitCode.BAD_INPUT, LakeError):
        checked = lake.verify()
    _print_shards(root, checked)


@lake_app.command("vacuum")
def lake_vacuum(
    root: Path = typer.Argument(..., metavar="LAKE", help="Lake root."),
    min_age_s: float = typer.Option(3600.0, "--min-age-s", help="Only files older than this (younger ones may be commits in progress)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be deleted."),
) -> None:
    """Delete temporary and uncatalogued shard files that crashed writers left behind."""
    from workers.lake import Lake

    doomed = Lake(root).vacuum(min_age_s=min_age_s, dry_run=dry_run)
    for path in doomed:
        typer.echo(f"{'would delete' if dry_run else 'deleted'} {path}")
    typer.echo(f"{len(doomed)} file(s)")


@lake_app.command("export")
def lake_export(
    root: Path = typer.Argument(..., exists=True, file_okay=False, metavar="LAKE", help="Lake root."),
    out: Path = typer.Option(..., "--out", metavar="DIR", help="New folder for the dataset (must not exist, or be empty)."),
    fmt: str = typer.Option("lerobot", "--format", help="Dataset format: lerobot (LeRobot v3.0)."),
    min_f1: Optional[float] = typer.Option(None, "--min-f1", help="Only shards with specialist F1 >= this."),
    split: list[str] = typer.Option([], "--split", help="Only these splits (train, eval, held-out; repeatable)."),
    song: list[str] = typer.Option([], "--song", help="Only these songs: name or content hash (prefix); repeatable."),
) -> None:
    """Write the lake's committed shards as a dataset other tools load, e.g. LeRobot's LeRobotDataset."""
    from workers.lake import LakeError
    from workers.lake.lerobot import export_lerobot

    if fmt != "lerobot":
        typer.echo(f"error: --format {fmt}: only lerobot is supported", err=True)
        raise typer.Exit(ExitCode.BAD_INPUT)
    with _fail_with(ExitCode.BAD_INPUT, LakeError, FileExistsError):
        summary = export_lerobot(root, out, min_f1=min_f1, splits=split or None, songs=song or None)
    typer.echo(f"wrote {summary.out}: LeRobot v3.0 dataset, {summary.episodes} episodes, {summary.frames} frames, "
               f"{summary.tasks} tasks, {summary.data_files} data file(s) from {summary.shards} shard(s); "
               f"splits {summary.splits}")


# ---- imitation learning: train a generalist on the lake, evaluate it on songs ------------------
@app.command("train-il")
def train_il_cmd(
    lake: Path = typer.Option(..., "--lake", exists=True, file_okay=False, metavar="DIR", help="Lake root (e.g. CAMPAIGN_DIR/lake)."),
    out: Optional[Path] = typer.Option(None, "--out", metavar="DIR",
                                       help="Checkpoints and policy.pt (default: the lake's parent/il/POLICY). Same DIR again resumes."),
    sets: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Config override, e.g. il.steps=5000 (repeatable)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="DDP workers (default: il.num_workers)."),
    policy: Optional[str] = typer.Option(None, "--policy", help="flow (flow-matching transformer) or bc (MLP baseline); default il.policy."),
    min_f1: Optional[float] = typer.Option(None, "--min-f1", help="Train on shards with specialist F1 >= this (default: gate.f1_threshold)."),
    mlflow_uri: Optional[str] = typer.Option(None, "--mlflow-uri", metavar="URI",
                                             help="MLflow tracking uri (default: the campaign's, when the lake is CAMPAIGN_DIR/lake)."),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment (default: the campaign's name)."),
    profile: str = typer.Option("local", "--profile", help="Config profile (configs/profiles/NAME.yaml)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to join (default: start Ray in this process)."),
) -> None:
    """Train the imitation policy on the lake's passing train shards with Ray Train (DDP); prints where policy.pt is."""
    if policy not in (None, "flow", "bc"):
        typer.echo(f"error: --policy {policy}: expected flow or bc", err=True)
        raise typer.Exit(ExitCode.BAD_INPUT)
    cfg = _load_config(profile, sets, None)
    _lake_or_exit(lake)
    import ray

    from orchestrator.tracking import tracking_uri_for
    from workers.imitation.trainer import train_il
    from workers.tracking import outbox_path

    campaign_dir = lake.resolve().parent
    if mlflow_uri is None and (cfg.mlflow.tracking_uri or (campaign_dir / "mlflow.db").exists()):
        mlflow_uri = tracking_uri_for(cfg.mlflow, campaign_dir)
    kind = policy or cfg.il.policy
    out = out or campaign_dir / "il" / kind
    started = not ray.is_initialized()
    if started:
        ray.init(address=ray_address, log_to_driver=False)
    try:
        outbox = outbox_path(campaign_dir) if (campaign_dir / "campaign.db").exists() else None  # a campaign's own
        result = train_il(lake, cfg, out, policy=kind, num_workers=workers, min_f1=min_f1,
                          tracking_uri=mlflow_uri, experiment=experiment or campaign_dir.name, outbox=outbox)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(ExitCode.FAILED) from None
    finally:
        if started:
            ray.shutdown()
    typer.echo(f"{kind} policy trained on {result.n_shards} shards of {len(result.song_hashes)} songs: "
               f"steps {result.start_step}->{result.steps}, loss {result.metrics.get('train/loss', float('nan')):.4g}")
    typer.echo(f"wrote {result.policy_path}" + (f"  (MLflow run {result.mlflow_run_id} at {mlflow_uri})" if mlflow_uri else ""))


@app.command("eval", context_settings={"allow_extra_args": True})
def eval_cmd(
    ctx: typer.Context,
    policy: Path = typer.Argument(..., exists=True, metavar="POLICY", help="policy.pt (or the folder holding it) from train-il."),
    songs: list[str] = typer.Option(..., "--songs", metavar="MANIFEST_OR_MIDI...",
                                    help="Manifests (.yaml/.csv) and/or MIDI files; more may follow, e.g. --songs a.mid b.mid."),
    episodes: int = typer.Option(1, "--episodes", min=1, help="Episodes per song chunk."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", exists=True, metavar="POLICY",
                                            help="A second policy evaluated beside it (e.g. the BC baseline)."),
    out: Optional[Path] = typer.Option(None, "--out", metavar="FILE.csv", help="Table file (default: eval.csv next to POLICY)."),
    max_chunks: Optional[int] = typer.Option(None, "--max-chunks", min=1, help="Only the first N chunks of each song."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Only the first N steps of each episode."),
    mlflow_uri: Optional[str] = typer.Option(None, "--mlflow-uri", metavar="URI", help="Also log the results to MLflow."),
    experiment: str = typer.Option("pianoforge-eval", "--experiment", help="MLflow experiment."),
    sets: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Config override, e.g. il.replan_every=1 (repeatable)."),
    profile: str = typer.Option("local", "--profile", help="Config profile (configs/profiles/NAME.yaml)."),
) -> None:
    """Roll POLICY out on songs; per-song precision, recall, F1 and means, songs seen in training vs held out."""
    from workers.imitation.evaluate import evaluate_policy, log_to_mlflow, print_table, summarize, write_csv
    from workers.piano.music import SongError

    cfg = _load_config(profile, sets, None)
    paths, names = [], []
    for item in list(songs) + list(ctx.args):
        if Path(item).suffix.lower() in (".yaml", ".yml", ".csv"):
            manifest = _manifest_or_exit(item, cfg)
            paths += [s.path for s in manifest.songs]
            names += [s.name for s in manifest.songs]
        else:
            paths.append(Path(item))
            names.append(None)
    if not paths:
        typer.echo("error: no songs to evaluate", err=True)
        raise typer.Exit(ExitCode.BAD_INPUT)
    rows = []
    with _fail_with(ExitCode.BAD_INPUT, SongError, ValueError, FileNotFoundError):
        for path in [policy] + ([baseline] if baseline else []):
            rows += evaluate_policy(path, paths, cfg, episodes=episodes, song_names=[n or Path(p).stem for p, n in zip(paths, names)],
                                    max_chunks=max_chunks, max_steps=max_steps, progress=True)
    rows = summarize(rows)
    print_table(rows)
    table_path = write_csv(rows, out or (policy if policy.is_dir() else policy.parent) / "eval.csv")
    typer.echo(f"wrote {table_path}")
    if mlflow_uri:
        run_id = log_to_mlflow(rows, mlflow_uri, experiment, params={"policy": str(policy), "baseline": str(baseline),
                                                                     "episodes": episodes, "songs": len(paths)})
        typer.echo(f"MLflow run {run_id} in experiment {experiment}")
# ---- end imitation learning -----------------------------------------------------------------------


def _add_registered_commands(target: typer.Typer) -> None:
    """Commands other packages register in the entry point group ``pianoforge.commands``
    (``pyproject.toml``; ``dashboard`` from ``dashboards.cli``): loaded by name, not imported.
    One that fails to load is left out with a warning; the other commands still work."""
    from importlib.metadata import entry_points

    for command in entry_points(group="pianoforge.commands"):
        try:
            target.command(command.name)(command.load())
        except Exception as e:  # noqa: BLE001 - a broken extra command must not take the CLI down
            typer.echo(f"warning: command '{command.name}' ({command.value}) not loaded: {type(e).__name__}: {e}",
                       err=True)


_add_registered_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
