"""What a person looks at: the campaign dashboard and its plots.

``pianoforge dashboard [CAMPAIGN] [--root DIR] [--port 8765] [--export FILE.html]`` serves one
page on localhost (or writes it as a self-contained HTML file) showing a campaign's units by
state over time, throughput, ETA, failures, the F1 of finished specialists against the gate,
pressed keys across the lake, learning curves from MLflow, which finger pressed which key
(OT fingering) and the audio of a unit's best rollout.

- :mod:`dashboards.data`: reads the store, the lake and MLflow (read-only) into a ``Snapshot``;
- :mod:`dashboards.fingering`: which finger pressed which key, pressed-key counts over the lake;
- :mod:`dashboards.mlflow_reader`: metric histories and run links from the tracking server;
- :mod:`dashboards.timeline`: progress numbers (states over time, throughput, ETA);
- :mod:`dashboards.plots`: plotly figures from plain data;
- :mod:`dashboards.audio`: a rollout's pressed keys to a WAV with RoboPianist's synthesizer;
- :mod:`dashboards.app`: the page, the HTTP server and the static export;
- :mod:`dashboards.cli`: the ``dashboard`` command, which the CLI loads through an entry point.

This package reads ``orchestrator`` and ``workers``; they never import it.
"""
