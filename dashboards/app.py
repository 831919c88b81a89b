"""The campaign dashboard: one HTML page, served on localhost or exported as a static file.

Routes of the server (:func:`serve`):

- ``/``: the page. Query: ``units=ID,ID`` picks the learning curves shown, ``unit=ID`` the unit
  whose fingering and audio are shown. While the campaign runs the page polls
  ``/api/summary`` every ``dashboard.refresh_s`` seconds and reloads when something changed;
  it stops polling once no unit is pending or running.
- ``/api/summary``: the headline numbers as JSON (:func:`dashboards.data.summary`).
- ``/audio/<unit_id>.wav``: the unit's best rollout, synthesized (rendered once, then cached
  under ``<campaign>/dashboard/audio/``).
- ``/static/plotly.min.js``: plotly's own bundle (no CDN: the page works offline).

Every request whose ``Host`` header does not name the server (see :func:`allowed_host_names`)
gets 403: a page elsewhere cannot read the dashboard by pointing its own domain at this address
(DNS rebinding).

:func:`export_html` writes the same page as one self-contained file (plotly.js inline, audio as
a data URI, no polling).
"""

from __future__ import annotations

import base64
import fnmatch
import html
import ipaddress
import json
import math
import socket
import threading
from functools import lru_cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import jinja2

import configs
from dashboards import plots, timeline
from dashboards.data import Campaign, Snapshot, running_packs, summary
from orchestrator.status import steps_text
from configs.files import atomic_write

TEMPLATES = Path(__file__).resolve().parent / "templates"

# The div ids of the page's plots (a browser test reads `document.getElementById(id).data`).
FIGURE_IDS = {
    "states": "fig-states", "throughput": "fig-throughput", "f1": "fig-f1", "lake_keys": "fig-keys",
    "gate": "fig-gate", "il": "fig-il", "il_eval": "fig-il-eval", "curves": "fig-curves", "fingers": "fig-fingers",
}


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined)


@lru_cache(maxsize=1)
def plotly_js() -> str:
    """plotly.js as shipped inside the plotly package (the page never loads it from a CDN)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def figures(s: Snapshot, dash: configs.DashboardConfig) -> dict[str, Any]:
    """The page's plotly figures, keyed as in :data:`FIGURE_IDS`."""
    times, counts = timeline.states_over_time(s.changes, now=s.until)
    done = timeline.finish_times(s.changes)
    start = s.started_at or s.taken_at
    edges, per_bin = timeline.throughput_bins(done, start, s.until)
    per_hour, _ = s.throughput_eta(dash.throughput_window_s)
    finished_f1 = [u.f1 for u in s.units if u.f1 is not None and u.state in ("succeeded", "gated")]
    figs = {
        "states": plots.states_over_time([timeline.iso(t) for t in times], counts),
        "throughput": plots.throughput([timeline.iso(t) for t in edges], per_bin, per_hour),
        "f1": plots.f1_histogram(finished_f1, s.gate.threshold),
        "lake_keys": plots.key_histogram(s.key_counts, s.lake_steps),
        "gate": plots.gate_status(s.gate.passing, s.gate.needed, s.gate.threshold, s.gate.launched),
        "il_eval": plots.evaluation_f1(s.il_eval),
        "il": plots.learning_curves({"imitation": s.il_curves} if s.il_curves else {},
                                    _metric_names([s.il_curves], dash.il_metrics), title="Imitation job (MLflow)"),
        "curves": plots.learning_curves(s.curves, _metric_names(s.curves.values(), dash.learning_curve_metrics),
                                        title="Learning curves (MLflow)"),
    }
    if s.focus is not None:
        figs["fingers"] = plots.finger_key_heatmap(s.focus.finger_key)
    return figs


def _metric_names(runs, patterns) -> list[str]:
    """The subplots of a learning-curve figure: the metric names logged by any of ``runs``
    (dicts keyed by metric) that match the configured ``patterns``, in the patterns' order;
    the plain patterns when nothing is logged yet."""
    logged = sorted({m for curves in runs for m in curves})
    names = [m for p in patterns for m in logged if fnmatch.fnmatchcase(m, p)]
    return list(dict.fromkeys(names)) or [p for p in patterns if "*" not in p]


def render_page(s: Snapshot, campaign: Campaign, *, live: bool, audio_src: str | None = None,
                video_src: str | None = None) -> str:
    """The page as HTML. ``live``: served (polls ``/api/summary``, loads plotly from the server,
    links pick units); otherwise self-contained (plotly inline)."""
    dash = campaign.dash
    info = summary(s, dash)
    figs = {name: fig.to_html(full_html=False, include_plotlyjs=False, div_id=FIGURE_IDS[name],
                              config={"displaylogo": False, "responsive": True})
            for name, fig in figures(s, dash).items()}

    def unit_link(uid: str) -> str:
        # Served: show that unit's fingering, audio and curves. Exported: jump to its table row.
        return f"?unit={quote(uid)}&units={quote(uid)}" if live else f"#row-{uid}"

    rows = []
    for u in sorted(s.units, key=lambda u: (u.state != "failed", u.song_name, u.chunk_index, u.unit_id)):
        seconds = u.seconds
        if seconds is None and u.state == "running" and u.started_at:
            seconds = s.taken_at - u.started_at
        rows.append({**u.__dict__, "link": unit_link(u.unit_id), "duration_text": timeline.human_duration(seconds)
                     if seconds is not None else "",
                     "stop_text": f"{u.stop_reason} at {steps_text(u.stop_step)}" if u.stop_reason else ""})
    view = {
        "campaign": s.campaign, "directory": s.directory, "problems": s.problems, "gate": s.gate,
        "lake_shards": s.lake_shards, "lake_episodes": s.lake_episodes,
        "unit_rows": rows, "failures": [r for r in rows if r["state"] == "failed" or (r["error"] and r["state"] != "succeeded")],
        "curve_units": [{"label": uid, "link": unit_link(uid)} for uid in s.curves],
        "curve_unit_ids": set(s.curves),
        "ray_dashboard": s.ray_dashboard,
        "packs": running_packs(s.units),
        "focus": None,
    }
    if s.focus is not None:
        f = s.focus
        view["focus"] = {"unit_id": f.unit_id, "song_name": f.song_name, "chunk_index": f.chunk_index, "seed": f.seed,
                         "f1": f.f1, "n_steps": f.n_steps, "how": f.how, "run_link": f.run_link,
                         "link": unit_link(f.unit_id), "audio_src": audio_src, "video_src": video_src,
                         "poster_src": video_src and f"/poster/{quote(f.unit_id)}.png"}
    return _environment().get_template("campaign.html").render(
        s=view, summary=info, figs=figs, states=timeline.STATES, colors=plots.STATE_COLORS, live=live,
        refresh_s=dash.refresh_s, plotly_js_inline=None if live else plotly_js(),
    )


def export_html(campaign: Campaign, out: str | Path, *, unit: str | None = None, units: list[str] | None = None,
                audio: bool = True) -> Path:
    """Write the page as one self-contained HTML file (opens offline); returns its path.
    ``audio``: embed the focus unit's rollout as a WAV data URI (when it can be rendered)."""
    s = campaign.snapshot(curve_units=units, focus_unit=unit)
    audio_src = None
    if audio and s.focus is not None:
        try:
            wav = campaign.render_audio(s.focus)
            audio_src = "data:audio/wav;base64," + base64.b64encode(wav.read_bytes()).decode()
        except Exception as e:  # no soundfont / fluidsynth: the page without audio is still useful
            s.problems.append(f"audio of unit {s.focus.unit_id}: {type(e).__name__}: {e}")
    text = render_page(s, campaign, live=False, audio_src=audio_src)
    with atomic_write(out, encoding="utf-8") as f:
        f.write(text)
    return Path(out)


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# /audio/<unit>.wav, /video/<unit>.mp4 and its /poster/<unit>.png: the unit's best recorded rollout,
# rendered by Campaign.<method>
MEDIA = {"/audio/": (".wav", "render_audio", "audio/wav"), "/video/": (".mp4", "render_video", "video/mp4"),
         "/poster/": (".png", "render_poster", "image/png")}


def _media(path: str) -> tuple[str, str, str] | None:
    """(unit id, Campaign method that renders it, content type) for a media path, else None."""
    for prefix, (suffix, render, content_type) in MEDIA.items():
        if path.startswith(prefix) and path.endswith(suffix):
            return unquote(path[len(prefix):-len(suffix)]), render, content_type
    return None


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


def allowed_host_names(bound_host: str, extra: tuple[str, ...] = ()) -> frozenset[str]:
    """Host header names (without port) the server answers to: the address it is bound to, the
    loopback names when it listens on loopback, this machine's names when it listens on every
    interface, and ``dashboard.allowed_hosts``. Any other name is a DNS-rebinding attempt (a page
    elsewhere whose domain now resolves to this address) or a mistake."""
    names = {bound_host.lower(), *(h.lower() for h in extra)}
    try:
        loopback = bound_host in WILDCARD_HOSTS or ipaddress.ip_address(bound_host).is_loopback
    except ValueError:  # a name, not an address
        loopback = bound_host.lower() == "localhost"
    if loopback:
        names |= LOOPBACK_NAMES
    if bound_host in WILDCARD_HOSTS:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    return frozenset(names)


def _host_name(header: str) -> str:
    """The name part of a Host header: ``name:port``, ``[v6]:port`` or a bare name."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class _Handler(BaseHTTPRequestHandler):
    campaign: Campaign  # set on the subclass made by make_server
    allowed_hosts: frozenset[str]  # set by make_server (see allowed_host_names)
    any_ip: bool  # listening on every interface: an IP address as Host is the one the client dialled
    server_version = "pianoforge-dashboard"

    def log_message(self, format: str, *args) -> None:  # quiet: one line per request is noise here
        pass

    def _send(self, status: int, body: bytes, content_type: str, cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, f"<h1>{status}</h1><pre>{html.escape(message)}</pre>".encode(), "text/html; charset=utf-8")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _host_refused(self) -> bool:
        """Answer 403 unless the Host header names this server (DNS rebinding protection)."""
        name = _host_name(self.headers.get("Host", ""))
        if name in self.allowed_hosts or (self.any_ip and _is_ip(name)):
            return False
        self._error(HTTPStatus.FORBIDDEN, f"Host {self.headers.get('Host', '(none)')!r} is not an address this dashboard "
                                          f"serves ({', '.join(sorted(self.allowed_hosts))}); "
                                          "dashboard.allowed_hosts adds names (a reverse proxy's, for example)")
        return True

    def do_GET(self) -> None:
        if self._host_refused():
            return
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            if url.path == "/":
                units = [u for u in query.get("units", "").split(",") if u] or None
                s = self.campaign.snapshot(curve_units=units, focus_unit=query.get("unit"))
                audio_src = f"/audio/{quote(s.focus.unit_id)}.wav" if s.focus is not None else None
                video_src = f"/video/{quote(s.focus.unit_id)}.mp4" if s.focus is not None else None
                body = render_page(s, self.campaign, live=True, audio_src=audio_src, video_src=video_src).encode()
                self._send(HTTPStatus.OK, body, "text/html; charset=utf-8")
            elif url.path == "/api/summary":
                s = self.campaign.snapshot(full=False)
                body = json.dumps(summary(s, self.campaign.dash), default=_json_default).encode()
                self._send(HTTPStatus.OK, body, "application/json")
            elif (media := _media(url.path)) is not None:
                unit_id, render, content_type = media
                focus = self.campaign.focus(unit_id)
                if focus is None:
                    return self._error(HTTPStatus.NOT_FOUND, f"unit {unit_id} has no committed lake shard")
                path = getattr(self.campaign, render)(focus)
                self._send(HTTPStatus.OK, path.read_bytes(), content_type, cache="max-age=3600")
            elif url.path == "/static/plotly.min.js":
                self._send(HTTPStatus.OK, plotly_js().encode(), "application/javascript", cache="max-age=86400")
            elif url.path == "/favicon.ico":
                self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no page {url.path}")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # show the problem in the browser rather than dropping the connection
            import traceback

            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")


def make_server(campaign: Campaign, host: str | None = None, port: int | None = None) -> ThreadingHTTPServer:
    """An HTTP server for ``campaign`` bound to ``host:port`` (defaults from ``dashboard``;
    port 0 picks a free one: read ``server.server_address``). Call ``serve_forever()``."""
    host = host or campaign.dash.host
    handler = type("CampaignHandler", (_Handler,), {
        "campaign": campaign, "allowed_hosts": allowed_host_names(host, campaign.dash.allowed_hosts),
        "any_ip": host in WILDCARD_HOSTS})
    server = ThreadingHTTPServer((host, campaign.dash.port if port is None else port), handler)
    server.daemon_threads = True
    return server


class DashboardServer:
    """The server on a background thread: ``with DashboardServer(campaign, port=0) as url: ...``."""

    def __init__(self, campaign: Campaign, host: str | None = None, port: int | None = None):
        self.server = make_server(campaign, host, port)
        self.thread = threading.Thread(target=self.server.serve_forever, name="dashboard", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/"

    def __enter__(self) -> str:
        self.thread.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
