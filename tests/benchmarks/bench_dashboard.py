"""Dashboard cost on a large campaign: what a page view and a summary poll take.

Run: .venv/bin/python tests/benchmarks/bench_dashboard.py [--units 2000] [--shards 200]
Writes a campaign through the store's and the lake's APIs (``--units`` units, every one with
pending/running/finished events; ``--shards`` of them with a lake shard of 2 x 550-step episodes),
then times, side by side: the first snapshot (reads every shard's ``pressed`` column), a warm
snapshot (per-shard key counts cached), the ``/api/summary`` snapshot, rendering the page, the
static export, and the focus unit's fingering (OT assignment re-run on its best episode) and WAV.
Times are CPU seconds of this process (``time.process_time``) and wall seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import configs
from dashboards.app import export_html, render_page
from dashboards.data import Campaign
from orchestrator.store import GATED, SUCCEEDED, CampaignStore
from workers.lake import Lake, ShardMeta, synthetic_episode
from workers.units import UnitResult, UnitSpec


def write_campaign(directory: Path, n_units: int, n_shards: int, steps: int) -> None:
    import yaml

    cfg = configs.load()
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    lake = Lake(directory / "lake", cfg.lake)
    with CampaignStore(directory / "campaign.db") as store:
        key = store.put_config(cfg.to_dict(), cfg.hash())
        specs = [UnitSpec.create(f"/songs/{i // 8}.mid", hashlib.sha256(str(i // 8).encode()).hexdigest(),
                                 f"song-{i // 8:04d}", i % 8, cfg.hash("env")) for i in range(n_units)]
        store.add_units(specs, key)
        for i, spec in enumerate(specs[: int(n_units * 0.8)]):
            store.mark_running(spec.unit_id)
            f1 = 0.5 + 0.5 * ((i * 7919) % 1000) / 1000
            shard_path = None
            if i < n_shards:
                eps = [synthetic_episode(steps, seed=10 * i + k, f1=f1) for k in range(2)]
                shard_path = str(lake.commit_shard(ShardMeta(spec.unit_id, spec.song_hash, spec.song_name,
                                                             spec.chunk_index, "train", spec.config_hash, f1), eps).path)
            result = UnitResult(unit_id=spec.unit_id, f1=f1, precision=f1, recall=f1, episode_return=1.0,
                                steps=1, shard_path=shard_path, seconds=1.0)
            store.mark_finished(spec.unit_id, result, SUCCEEDED if f1 >= 0.75 else GATED)
        for spec in specs[int(n_units * 0.8): int(n_units * 0.85)]:
            store.mark_running(spec.unit_id)


def timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=200)
    ap.add_argument("--steps", type=int, default=550)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "bench"
        _, c, w = timed(lambda: write_campaign(directory, args.units, args.shards, args.steps))
        Console().print(f"wrote {args.units} units, {args.shards} shards in {w:.1f} s")
        campaign = Campaign(directory)
        rows = []
        s, c, w = timed(campaign.snapshot)
        rows.append(("first snapshot (reads every shard's keys, fingering of the focus unit)", c, w))
        s, c, w = timed(campaign.snapshot)
        rows.append(("warm snapshot (page view)", c, w))
        _, c, w = timed(lambda: campaign.snapshot(full=False))
        rows.append(("summary snapshot (/api/summary poll)", c, w))
        html, c, w = timed(lambda: render_page(s, campaign, live=True, audio_src=None))
        rows.append((f"render page ({len(html) / 1e6:.2f} MB without plotly.js)", c, w))
        out, c, w = timed(lambda: export_html(campaign, Path(tmp) / "export.html"))
        rows.append((f"static export with WAV ({out.stat().st_size / 1e6:.1f} MB)", c, w))
        table = Table(title=f"dashboard, {args.units} units, {args.shards} shards x 2 x {args.steps} steps")
        table.add_column("what")
        table.add_column("CPU s", justify="right")
        table.add_column("wall s", justify="right")
        for what, c, w in rows:
            table.add_row(what, f"{c:.3f}", f"{w:.3f}")
        Console().print(table)


if __name__ == "__main__":
    main()
