"""The ``pianoforge dashboard`` command, registered with the CLI through the entry point group
``pianoforge.commands`` (``pyproject.toml``): the CLI loads it by name, so ``orchestrator``
never imports this package."""

from __future__ import annotations

from typing import Optional

import typer


def dashboard(
    campaign: Optional[str] = typer.Argument(None, help="Campaign name under --root (default: the one changed last)."),
    root: Optional[str] = typer.Option(None, "--root", help="Folder of campaign directories (default: campaign.root)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port on localhost (default: dashboard.port, 8765; 0: any free)."),
    export: Optional[str] = typer.Option(None, "--export", metavar="FILE.html",
                                         help="Write the page as one self-contained HTML file and exit."),
    unit: Optional[str] = typer.Option(None, "--unit", help="Unit whose fingering and audio to show (default: best F1)."),
) -> None:
    """Show a campaign's progress in the browser: states, throughput, ETA, failures, F1, gate, curves, audio."""
    import configs
    from dashboards.app import DashboardServer, export_html
    from dashboards.data import Campaign, CampaignNotFound, find_campaign
    from orchestrator.cli import ExitCode, _fail_with

    with _fail_with(ExitCode.BAD_INPUT, CampaignNotFound):
        directory = find_campaign(root or configs.load(profile=None).campaign.root, campaign)
    camp = Campaign(directory)
    if export:
        out = export_html(camp, export, unit=unit)
        typer.echo(f"wrote {out}")
        return
    server = DashboardServer(camp, port=port)
    url = server.url + (f"?unit={unit}" if unit else "")
    with server:
        typer.echo(f"campaign {camp.name} ({directory}) on {url}  (Ctrl-C stops)")
        try:
            server.thread.join()
        except KeyboardInterrupt:
            pass
