"""Screenshots of the MLflow UI on the demo search, for the README (a script run by hand).

By default it runs the demo search (``reid-tune search_spaces/demo.yaml``, a few minutes on a 2-core CPU)
and promotes its best trial in a temporary folder, with the runs in ``sqlite:///<tmp>/mlflow.db``; with
``--tracking-uri`` it uses that store's latest search instead. It then serves the store as ``reid-tune
ui`` does (MLflow's UI opening on model training) and, in headless Chromium, writes to ``--out``:

- ``runs.png``: the experiment's runs table with the ``eval/best_mAP``, ``eval/mAP`` and ``eval/rank1``
  columns, sorted by ``eval/best_mAP`` (descending); with ``--nested``, in MLflow's default order instead
  (newest first), the trials expanded under the search's parent run: MLflow nests child runs only when
  the runs are sorted by creation time;
- ``trial.png``: the best trial's (tag ``reid_tune.best`` = "true") "Model metrics" tab, scrolled to its
  validation charts (``eval/*``), the first section (MLflow orders them alphabetically).

It needs Debian's Chromium (``apt-get install chromium``; Playwright's own browsers are not used) and
Playwright (``pip install -e ".[ui]"``)::

    python tools/ui_screenshots.py
    python tools/ui_screenshots.py --tracking-uri sqlite:///$PWD/mlflow.db --out /tmp/shots
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.entities import Experiment, Run
from mlflow.tracking import MlflowClient
from playwright.sync_api import Page, sync_playwright

from reid_tune.search.keys import (
    BEST_METRIC,
    BEST_TAG,
    PARENT_TAG,
    ROLE_TAG,
    VAL_MAP,
    VAL_PREFIX,
    VAL_RANK1_NAME,
)
from reid_tune.tracking.store import resolve_tracking_uri
from reid_tune.tracking.ui import start_ui, stop_ui

REPO = Path(__file__).resolve().parent.parent
DEMO_SPACE = REPO / "search_spaces" / "demo.yaml"
OUT = REPO / "tools" / "screenshots"
EXPERIMENT = "demo"  # the experiment (and parent run) name of search_spaces/demo.yaml
COLUMNS = (VAL_MAP, VAL_RANK1_NAME)  # shown with BEST_METRIC
HIDDEN_COLUMNS = ("Dataset", "Source", "Models")  # MLflow's default columns, empty for a search
VALIDATION = VAL_PREFIX.rstrip("/")  # the validation metrics' section
VIEWPORT = {"width": 1400, "height": 900}
TIMEOUT_MS = 60_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tracking-uri", help="use this store's latest search instead of running the demo")
    parser.add_argument("--experiment", default=EXPERIMENT, help="experiment name (default: %(default)s)")
    parser.add_argument(
        "--out", type=Path, default=OUT, help="folder for the PNGs (default: tools/screenshots)"
    )
    parser.add_argument("--nested", action="store_true", help="runs table nested, not sorted by val mAP")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    return parser.parse_args(argv)


def tool(name: str) -> str:
    """The console script ``name`` of this Python's environment, else the one on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        sys.exit(f"error: {name} not found (pip install -e '.[ui]' in this environment)")
    return found


def run_demo(folder: Path) -> str:
    """Run the demo search and promote its best trial in ``folder``; the tracking URI of its store."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    started = time.monotonic()
    for args in ([str(DEMO_SPACE)], ["promote", EXPERIMENT]):
        status = subprocess.run([tool("reid-tune"), *args, "--tracking-uri", uri], cwd=folder).returncode
        if status:
            sys.exit(f"error: reid-tune {' '.join(args)} failed (exit status {status})")
    print(f"demo search and promote: {time.monotonic() - started:.0f} s")
    return uri


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_runs(client: MlflowClient, name: str) -> tuple[Experiment, Run, Run]:
    """The experiment, its latest search's parent run and that search's best trial run."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        sys.exit(f"error: no experiment {name!r} in {client.tracking_uri}")
    parents = client.search_runs(
        [experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'search'", order_by=["attributes.start_time DESC"]
    )
    if not parents:
        sys.exit(f"error: experiment {name!r} has no search run")
    parent = parents[0]
    best = client.search_runs(
        [experiment.experiment_id],
        f"tags.`{PARENT_TAG}` = '{parent.info.run_id}' and tags.`{BEST_TAG}` = 'true'",
    )
    if not best:
        sys.exit(f"error: search run {parent.info.run_name} has no trial tagged {BEST_TAG}")
    return experiment, parent, best[0]


def prepare(page: Page, base: str) -> None:
    """Open the UI (reid-tune's app: in the model-training view) and close the assistant panel."""
    page.goto(base)
    page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]').click()


def shoot_runs(
    page: Page, base: str, experiment: Experiment, parent: Run, best: Run, path: Path, *, nested: bool
) -> None:
    """The runs table with the validation columns instead of the dataset, source and models ones: sorted
    by the best validation mAP, or (``nested``) in MLflow's default order, trials expanded under their
    parent run (MLflow nests runs only when they are sorted by creation time)."""
    page.goto(f"{base}/#/experiments/{experiment.experiment_id}/runs")
    page.get_by_text(parent.info.run_name, exact=True).first.wait_for()
    if nested:
        toggle_columns(page, [*HIDDEN_COLUMNS, BEST_METRIC, *COLUMNS])
        expand(page, parent)
    else:
        sort_by(page, BEST_METRIC)
        toggle_columns(page, [*HIDDEN_COLUMNS, *COLUMNS])
    page.get_by_role("link", name=best.info.run_name, exact=True).wait_for()
    for name in (BEST_METRIC, *COLUMNS):
        fit_column(page, name)
    page.get_by_role("heading", name="Runs", exact=True).click()  # no focused cell, no hover
    settle(page)
    page.screenshot(path=path)


def sort_by(page: Page, metric: str) -> None:
    """Sort the runs by ``metric``, descending, with the sort selector (which also adds its column)."""
    page.get_by_test_id("sort-select-dropdown").click()
    page.get_by_test_id(f"sort-select-{metric}").click()
    page.get_by_test_id("sort-select-dropdown").click()
    page.get_by_test_id("sort-select-desc").click()
    page.keyboard.press("Escape")


def toggle_columns(page: Page, names: list[str]) -> None:
    """Tick or untick the columns ``names`` in the "Columns" selector."""
    page.get_by_role("button", name="Columns", exact=True).click()
    search = page.get_by_placeholder("Search columns")
    titles = page.get_by_test_id("column-selector-tree").locator("[class*=tree-title]")
    for name in names:
        search.fill(name)
        titles.filter(has_text=re.compile(f"^{re.escape(name)}$")).click()
    page.keyboard.press("Escape")


def fit_column(page: Page, name: str) -> None:
    """Widen the column ``name`` to its values (a double click on its header's resize handle)."""
    header = page.locator(".ag-header-cell").filter(has=page.get_by_text(name, exact=True))
    header.locator(".ag-header-cell-resize").dblclick()


def expand(page: Page, parent: Run) -> None:
    """Open the parent run's row to show its trials."""
    row = page.locator(".ag-row").filter(has=page.get_by_role("link", name=parent.info.run_name, exact=True))
    row.get_by_role("button").first.click()


def shoot_trial(page: Page, base: str, experiment: Experiment, best: Run, path: Path) -> None:
    """The best trial's "Model metrics" tab at its validation section (the first: MLflow orders the
    sections alphabetically, ``eval`` before ``test`` and ``train``)."""
    page.goto(f"{base}/#/experiments/{experiment.experiment_id}/runs/{best.info.run_id}/model-metrics")
    header = page.locator("[role=button][aria-expanded=true]").filter(
        has=page.get_by_test_id("experiment-view-compare-runs-section-header").get_by_text(
            VALIDATION, exact=True
        )
    )
    header.evaluate("element => element.scrollIntoView({block: 'start'})")
    page.get_by_role("heading", name=best.info.run_name, exact=True).hover()  # no chart toolbar
    settle(page)
    page.screenshot(path=path)


def settle(page: Page) -> None:
    """Let the last requests finish and the charts draw (the UI polls, so the network never idles)."""
    page.wait_for_timeout(3000)


def screenshots(uri: str, args: argparse.Namespace) -> list[Path]:
    """Serve ``uri`` with ``mlflow ui`` and take both screenshots into ``args.out``; the files written."""
    experiment, parent, best = find_runs(MlflowClient(tracking_uri=uri), args.experiment)
    args.out.mkdir(parents=True, exist_ok=True)
    runs, trial = args.out / "runs.png", args.out / "trial.png"
    server, base = start_ui(uri, port=free_port(), quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium)
            page = browser.new_page(viewport=VIEWPORT, device_scale_factor=1)
            page.set_default_timeout(TIMEOUT_MS)
            prepare(page, base)
            shoot_runs(page, base, experiment, parent, best, runs, nested=args.nested)
            shoot_trial(page, base, experiment, best, trial)
            browser.close()
    finally:
        stop_ui(server)
    return [runs, trial]


def main(argv: list[str] | None = None) -> None:
    """Run the demo (unless given a store), then take and report the screenshots."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="reid-ui-") as tmp:
        folder = Path(tmp)
        uri = resolve_tracking_uri(args.tracking_uri) if args.tracking_uri else run_demo(folder)
        for path in screenshots(uri, args):
            print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
