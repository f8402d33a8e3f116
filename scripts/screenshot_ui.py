"""Screenshot the Dagster UI's global asset graph (lineage, every group expanded) to a PNG.

    python scripts/screenshot_ui.py                    # start `dagster dev`, shoot, stop it
    python scripts/screenshot_ui.py --url http://127.0.0.1:3000 --out /tmp/graph.png  # a running UI
    python scripts/screenshot_ui.py --check-assets corpus,search_index

Without ``--url`` it starts ``dagster dev -w workspace.yaml`` (the ``dagster`` next to
``sys.executable``) on 127.0.0.1 and a free port in its own process group, waits until the code
location has loaded, and always stops the whole group at the end. ``$DAGSTER_HOME`` is used if set,
else the project's ``$AUTOCOA_HOME/dagster_home`` (as ``autocoa ui``), so materialised assets show
green; an unmaterialised instance works too. The page is shot with Playwright driving Debian's
headless ``/usr/bin/chromium`` (``$CHROMIUM``; ``pip install playwright``, never ``playwright install``).
Exits 1 when the UI never comes up (with the tail of the dagster log), when a ``--check-assets``
name is not defined or not drawn, or when the PNG is missing or too small to be a drawn graph.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
]
DEFAULT_ASSETS = "embedded_world,hotpotqa_raw,question_sample,corpus,search_index,cot_trajectories,coa_trajectories"
MIN_PNG_BYTES = 50_000  # the loading-spinner page is ~37 kB, the drawn graph ~150 kB
STATUS_QUERY = """{ workspaceOrError { __typename ... on Workspace { locationEntries {
  name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } }
  assetNodes { groupName assetKey { path } } }"""


class UIError(RuntimeError):
    """A failure reported as one clear message (exit code 1)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(url: str, body: dict[str, Any] | None = None, timeout: float = 10) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def start_dagster(port: int, log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if not env.get("DAGSTER_HOME"):
        sys.path.insert(0, str(REPO_ROOT))
        from pipelines.cli import ensure_dagster_home
        from qadata.paths import default_home

        env["DAGSTER_HOME"] = str(ensure_dagster_home(default_home()))
    exe = Path(sys.executable).parent / "dagster"
    cmd = [str(exe), "dev", "-w", str(REPO_ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)]
    print(f"starting {' '.join(cmd)} (DAGSTER_HOME={env['DAGSTER_HOME']}, log {log_path})")
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            # a shell's background job inherits SIGINT ignored; stop_dagster needs it
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def stop_dagster(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C the whole process group (dagster dev shuts down cleanly on SIGINT, not always on
    SIGTERM), then escalate; returns once no process of the group is left."""
    for sig, grace in ((signal.SIGINT, 30.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def wait_for_ui(base: str, timeout: float, proc: subprocess.Popen[bytes] | None, log_path: Path | None) -> Any:
    """Poll /server_info, then GraphQL until the code location is LOADED; returns the GraphQL data."""
    deadline, last = time.monotonic() + timeout, "no answer from /server_info"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            last = f"dagster dev exited with code {proc.returncode}"
            break
        try:
            http(f"{base}/server_info", timeout=5)
            data = http(f"{base}/graphql", {"query": STATUS_QUERY}, timeout=30)["data"]
            entries = data["workspaceOrError"].get("locationEntries") or []
            for e in entries:
                loc = e.get("locationOrLoadError") or {}
                if loc.get("__typename") == "PythonError":
                    raise UIError(f"code location {e['name']} failed to load:\n{loc.get('message')}")
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                return data
            last = f"locations: {[(e['name'], e['loadStatus']) for e in entries]}"
        except UIError:
            raise
        except Exception as exc:  # connection refused, timeouts, GraphQL not ready yet
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(1)
    lines = log_path.read_text(errors="replace").splitlines()[-40:] if log_path and log_path.exists() else []
    tail = "\n--- tail of the dagster dev log ---\n" + "\n".join(lines) if lines else ""
    raise UIError(f"Dagster UI at {base} did not come up within {timeout:.0f}s ({last}){tail}")


# texts of the graph's leaf elements (asset names live in SVG foreignObjects; long ones are elided)
LEAF_TEXTS_JS = """() => [...document.querySelectorAll('svg foreignObject *')]
  .filter(e => e.children.length === 0).map(e => e.textContent.trim()).filter(Boolean)"""


def drawn(name: str, texts: list[str]) -> bool:
    """Whether ``name`` is on the page, in full or elided as ``head…tail``."""
    for text in texts:
        head, ellipsis, tail = text.replace("...", "…").partition("…")
        if text == name or (ellipsis and head and name.startswith(head) and name.endswith(tail)):
            return True
    return False


def screenshot(base: str, groups: list[str], assets: list[str], out: Path, timeout: float) -> list[str]:
    """Open the global asset graph with every group expanded, save a PNG; returns the assets drawn."""
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise UIError(
            f"needs Playwright: pip install playwright (no `playwright install`: it drives {CHROMIUM})"
        ) from None
    if not Path(CHROMIUM).is_file():
        raise UIError(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set $CHROMIUM)")
    # group ids as the graph names them (global, and per code location behind a feature flag)
    expanded = [f"global@global:{g}" for g in groups] + [f"__repository__@autocoa:{g}" for g in groups]
    url = f"{base}/asset-groups?expanded={quote(','.join(expanded), safe='')}"
    print(f"opening {url}")
    try:
        with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1600, "height": 1000},
            )
            # skip the "Join the Dagster community" dialog (the UI reads this key from localStorage)
            ctx.add_init_script("window.localStorage.setItem('communityNux', JSON.stringify('1'));")
            page = ctx.new_page()
            page.goto(url, wait_until="domcontentloaded", timeout=timeout * 1000)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not all(drawn(a, page.evaluate(LEAF_TEXTS_JS)) for a in assets):
                page.wait_for_timeout(500)
            try:
                page.wait_for_load_state("networkidle", timeout=15_000)
            except PlaywrightError:
                pass  # a UI that keeps polling never goes idle; the graph is drawn anyway
            page.wait_for_timeout(1500)  # let the zoom-to-fit animation settle
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            texts = page.evaluate(LEAF_TEXTS_JS)
            ctx.close()
    except PlaywrightError as exc:
        raise UIError(f"browser failed on {url}: {exc}") from exc
    return [a for a in assets if drawn(a, texts)]


def materialize_through_ui(base: str, job: str, timeout: float) -> None:
    """Launch ``job`` the way the UI's "Materialize all" does (GraphQL, run launcher) and wait for it."""
    from urllib.parse import urlparse

    from dagster_graphql import DagsterGraphQLClient

    url = urlparse(base)
    client = DagsterGraphQLClient(url.hostname or "127.0.0.1", port_number=url.port)
    run_id = client.submit_job_execution(job, repository_location_name="autocoa", repository_name="__repository__")
    print(f"launched {job} through the UI's GraphQL API: run {run_id}")
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_run_status(run_id).value
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            if status != "SUCCESS":
                raise UIError(f"run {run_id} of {job} launched from the UI ended {status}; see {base}/runs/{run_id}")
            print(f"run {run_id} succeeded")
            return
        time.sleep(2)
    raise UIError(f"run {run_id} of {job} did not finish within {timeout:.0f}s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="base URL of a running Dagster UI (default: start `dagster dev`)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "screenshots" / "asset_graph.png")
    ap.add_argument(
        "--check-assets",
        default=DEFAULT_ASSETS,
        help=f"comma-separated asset names that must be drawn (default: {DEFAULT_ASSETS})",
    )
    ap.add_argument("--timeout", type=float, default=180, help="seconds to wait for the UI and the graph")
    ap.add_argument(
        "--materialize",
        metavar="JOB",
        help="first launch JOB from the UI (e.g. autocoa_before_synthesis) and "
        "require it to succeed, so the screenshot shows materialised assets",
    )
    args = ap.parse_args(argv)
    assets = [a.strip() for a in args.check_assets.split(",") if a.strip()]
    out: Path = args.out.resolve()
    out.unlink(missing_ok=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below still stops dagster
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    try:
        if args.url:
            base = args.url.rstrip("/")
        else:
            port = free_port()
            log_path = Path(tempfile.mkdtemp(prefix="dagster-dev-")) / "dagster_dev.log"
            proc = start_dagster(port, log_path)
            base = f"http://127.0.0.1:{port}"
        data = wait_for_ui(base, args.timeout, proc, log_path)
        nodes = {"/".join(n["assetKey"]["path"]): n["groupName"] for n in data["assetNodes"]}
        print(f"UI up at {base}: {len(nodes)} assets in groups {sorted(set(nodes.values()))}")
        undefined = [a for a in assets if a not in nodes]
        if undefined:
            raise UIError(f"assets not in the definitions: {undefined} (known: {sorted(nodes)})")
        if args.materialize:
            materialize_through_ui(base, args.materialize, max(args.timeout, 600))
        found = screenshot(base, sorted(set(nodes.values())), assets, out, args.timeout)
    except UIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            stop_dagster(proc)
            print("stopped dagster dev")

    missing = [a for a in assets if a not in found]
    print(f"assets drawn on the page: {found}")
    if not out.is_file():
        print(f"error: no screenshot at {out}", file=sys.stderr)
        return 1
    size = out.stat().st_size
    if missing or size < MIN_PNG_BYTES:
        print(f"error: graph looks incomplete or blank (missing {missing}, {size} bytes): {out}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
