"""The README is a front door and the manual a MkDocs site in docs/, built in strict mode.

The strict build fails on any warning: a link to a page or anchor that does not exist, a page
left out of `nav`, a `nav` entry without its page. The README stays short, every page it links
to exists, and its two commands are the ones CI and a newcomer run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 200
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _mkdocs_build(root: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(root / "mkdocs.yml"),
         "--site-dir", str(site)],
        capture_output=True, text=True, timeout=120)


def test_the_site_builds_strictly_without_a_warning(tmp_path):
    run = _mkdocs_build(ROOT, tmp_path / "site")
    assert run.returncode == 0, run.stderr
    assert "WARNING" not in run.stderr, run.stderr
    for page in yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]:
        (target,) = page.values()
        assert (tmp_path / "site" / target.replace(".md", "") / "index.html").exists() or target == "index.md"


@pytest.mark.parametrize("breakage", ["dead link", "dead anchor", "page missing from nav"])
def test_the_strict_build_fails_on_a_broken_site(tmp_path, breakage):
    """The configuration in mkdocs.yml really catches what the build above is trusted to catch."""
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", copy / "docs")
    usage = copy / "docs" / "usage.md"
    if breakage == "dead link":
        usage.write_text(usage.read_text() + "\nSee [the lost page](no-such-page.md).\n")
    elif breakage == "dead anchor":
        usage.write_text(usage.read_text() + "\nSee [faults](faults.md#no-such-section).\n")
    else:
        (copy / "docs" / "orphan.md").write_text("# Orphan\n")
    run = _mkdocs_build(copy, tmp_path / "site")
    assert run.returncode != 0, f"{breakage} went through the strict build:\n{run.stderr}"


def test_the_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; the manual belongs in docs/ (at most {README_MAX_LINES})"


def test_every_page_the_readme_links_to_exists_and_is_in_the_site():
    nav = {target for page in yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"] for target in page.values()}
    links = [t for t in LINK.findall(README.read_text()) if not re.match(r"[a-z]+://|#|mailto:", t)]
    assert links, "the README links to no page of the manual"
    for target in links:
        path = ROOT / target.split("#")[0]
        assert path.exists(), f"README.md links to {target}, which does not exist"
        if path.parent == ROOT / "docs":
            assert path.name in nav, f"README.md links to {target}, which is not in mkdocs.yml's nav"


def test_the_readme_gives_the_demo_command_and_the_ci_test_command():
    text = README.read_text()
    assert "bash .ci/setup.sh && .venv/bin/pianoforge demo" in text
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("bash .ci/setup.sh")]
    assert len(ci) == 1 and ci[0] in text, "the README's test command is not the one .ci/run runs"


def test_the_exit_status_table_lists_every_exit_code_once():
    from orchestrator.cli import ExitCode

    text = (ROOT / "docs" / "faults.md").read_text()
    section = text.split("## Exit status of every command", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \|", section, flags=re.M)
    assert sorted(map(int, rows)) == sorted(int(code) for code in ExitCode)
