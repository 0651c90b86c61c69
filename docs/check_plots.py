"""Check that the pipeline's DVC plots render with no network, and screenshot them.

`dvc plots show` fills the HTML template that .dvc/config names (plots.html_template: .dvc/plots/offline.html,
which carries vega, vega-lite and vega-embed inline). This runs it in REPO, fails if the page still loads a script
over http(s), then has headless Chromium render the page with no network: once to count the plots that drew
(vega-embed draws each into one `marks` canvas), once for the screenshot.

    python docs/check_plots.py [REPO]    # REPO: the repository root, default the current directory

Needs dvc (the project's venv) and Chromium (Debian: `apt-get install -y chromium`); about 10 s.
Fails with one line on stderr when dvc writes no page, a script comes over http(s), Chromium is missing, or fewer
plots drew than the page holds.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
REMOTE_SCRIPT = re.compile(r"""<script[^>]*\bsrc\s*=\s*["']?(https?:)?//[^"'\s>]+""", re.IGNORECASE)
PLOT_CALL = "vegaEmbed("  # one per vega plot in DVC's page (dvc_render's VegaRenderer.DIV)
DRAWN_PLOT = re.compile(r'<(canvas|svg)\b[^>]*class="marks"')
# The flags keep Chromium's own traffic (updates, sync) off and send any request to a closed loopback port, so that
# even without a network namespace nothing leaves the machine. --no-sandbox: the sandbox refuses to start as root
# and in most containers; the page is one this script just had dvc write.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-default-apps",
    "--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
    "--virtual-time-budget=10000",  # let the page's scripts finish drawing before the DOM dump or screenshot
]


class CheckFailed(Exception):
    """One line for the user: what failed and what to do."""


def _dvc_command() -> list[str]:
    dvc = shutil.which("dvc")
    return [dvc] if dvc else [sys.executable, "-m", "dvc"]


def _chromium_command() -> list[str]:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            break
    else:
        raise CheckFailed("chromium not found on PATH: install it with `apt-get install -y chromium` (Debian)")
    # A network namespace of its own is the strongest offline (root, or unprivileged user namespaces).
    if shutil.which("unshare") and subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0:
        return ["unshare", "--net", path]
    return [path]


def _render_page(*, repo: Path) -> Path:
    page = repo / "dvc_plots" / "index.html"
    # DVC exits 0 without writing a page when plot data is missing: an old page must not pass for a new one.
    page.unlink(missing_ok=True)
    result = subprocess.run(
        [*_dvc_command(), "plots", "show", "--out", str(page.parent)],
        cwd=repo, capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"},
    )
    if result.returncode != 0 or not page.is_file():
        last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1].rstrip(".")
        raise CheckFailed(f"dvc plots show wrote no page ({last}): run `dvc repro` or `dvc pull` first")
    return page


def check_plots(*, repo: Path) -> tuple[Path, int]:
    """Render REPO's plots offline and screenshot them.

    Args:
        repo: a DVC repository root whose plot data is in the workspace.
    Returns:
        The screenshot's path and the number of plots that drew.
    Raises:
        CheckFailed: with one line saying what failed.
    """
    if not (repo / "dvc.yaml").is_file():
        raise CheckFailed(f"{repo} has no dvc.yaml: pass the repository root")
    chromium = _chromium_command()  # before dvc: a missing browser is the likelier failure, and the quicker one
    page = _render_page(repo=repo)
    html = page.read_text(encoding="utf-8")
    remote = REMOTE_SCRIPT.search(html)
    if remote:
        raise CheckFailed(
            f"{page} loads a script over the network ({remote.group(0)!r}): "
            "set plots.html_template in .dvc/config to plots/offline.html"
        )
    expected = html.count(PLOT_CALL)
    screenshot = page.with_name("screenshot.png")
    with tempfile.TemporaryDirectory() as profile:  # a throwaway profile: nothing read from or left in ~/.config
        run = [*chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
        dom = subprocess.run([*run, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
        drawn = len(DRAWN_PLOT.findall(dom.stdout))
        subprocess.run(
            [*run, f"--screenshot={screenshot}", "--window-size=1200,1600", page.as_uri()],
            capture_output=True, timeout=120,
        )
    if not screenshot.is_file():
        raise CheckFailed(f"chromium wrote no screenshot of {page}")
    if drawn < expected:
        raise CheckFailed(f"only {drawn} of {expected} plots drew offline in {page}; see {screenshot}")
    return screenshot, drawn


def main() -> None:
    if len(sys.argv) > 2:
        sys.exit("usage: python docs/check_plots.py [REPO]")
    repo = Path(sys.argv[1] if len(sys.argv) == 2 else ".").resolve()
    try:
        screenshot, drawn = check_plots(repo=repo)
    except CheckFailed as e:
        sys.exit(f"check_plots: {e}")
    print(f"check_plots: {drawn} plots drew with no network; screenshot: {screenshot}")


if __name__ == "__main__":
    main()
