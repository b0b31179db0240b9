"""The concept explorer in a real browser: JupyterLab, in Debian's chromium driven by Playwright,
opens notebook 06 of the quick run, runs all its cells, and the test then uses the explorer's
controls (concept search, sort order, image picker, translation view), checking that what is
shown changes as it should and that no error reaches the page, the console or a cell output.
Screenshots of every step go to ``$USAE_SCREENSHOTS``, else to ``<quick run>/screenshots``.

Skipped, with the reason, where Playwright or chromium is missing (``bash install.sh`` installs
both); anything else that goes wrong, JupyterLab not starting included, fails.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest

from conftest import ROOT

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright is not installed (bash install.sh installs it)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:  # checked on import, so that a machine without it skips the quick run too
    pytest.skip("chromium not found on PATH: bash install.sh installs Debian's chromium (as root),"
                " or: apt-get install --no-install-recommends chromium", allow_module_level=True)

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

NOTEBOOK = "notebooks/06_unique_concepts_and_explorer.ipynb"
VIEWPORT = {"width": 1600, "height": 1200}
WAIT_MS = 60_000  # one control's effect: a redraw in the kernel, on a busy 2-core machine
RUN_MS = 600_000  # the whole notebook, from a fresh kernel
# JupyterLab settings of the private settings folder: no news or update toasts over the page,
# no autosave (the quick run's executed notebook stays as run_all.sh wrote it), and every cell
# attached to the page (no windowing), so that every output can be read.
SETTINGS = {
    "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "docmanager-extension/plugin": {"autosave": False},
    "notebook-extension/tracker": {"windowingMode": "none"},
}
# Kernel messages carrying an error, as they cross the notebook's websocket: a failing cell
# and an exception in a widget callback (which JupyterLab shows only in its log console).
KERNEL_ERROR = re.compile(r'"msg_type":\s*"error"|"name":\s*"stderr".{0,400}Traceback', re.S)


class Lab(NamedTuple):
    url: str  # http://127.0.0.1:<port>
    token: str
    process: subprocess.Popen
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_lab(root: Path, state: Path, timeout: float = 180) -> Lab:
    """JupyterLab on 127.0.0.1 serving ``root``, its state private to ``state``.

    The configuration, data, runtime, settings and workspace folders are all under ``state``
    (the kernelspec is still found, in ``sys.prefix``); the token is random, the port free.
    Kernels get the repository on their ``PYTHONPATH`` and ``PYTHONHASHSEED=0``, as run_all.sh's.

    Returns
    -------
    Lab
        Once ``/api/status`` answers; fails the test with the server's log if it exits or
        does not answer within ``timeout`` seconds.
    """
    for name, values in SETTINGS.items():
        path = state / "settings" / "@jupyterlab" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    token, port = secrets.token_hex(16), free_port()
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONHASHSEED": "0",
           "JUPYTER_CONFIG_DIR": str(state / "config"), "JUPYTER_DATA_DIR": str(state / "data"),
           "JUPYTER_RUNTIME_DIR": str(state / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(state / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(state / "workspaces")}
    log = state / "jupyterlab.log"
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
               f"--port={port}", "--port-retries=0", f"--ServerApp.root_dir={root}",
               f"--IdentityProvider.token={token}", "--ServerApp.allow_root=True",
               "--LabApp.news_url=None",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    with log.open("wb") as output:  # a file, not a pipe that could fill and block the server
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env,
                                   cwd=root, start_new_session=True)
    lab = Lab(f"http://127.0.0.1:{port}", token, process, log)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{lab.url}/api/status?token={token}", timeout=5) as r:
                if r.status == 200:
                    return lab
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_lab(lab)
            pytest.fail(f"JupyterLab did not start (exit {process.returncode}):\n"
                        + log.read_text(errors="replace")[-3000:])
        time.sleep(0.2)


def stop_lab(lab: Lab) -> None:
    """Shut the kernels down through the API (they run in sessions of their own), then stop
    the server's process group: SIGTERM, and SIGKILL if it is still there after 30 s."""
    if lab.process.poll() is None:
        try:
            with urllib.request.urlopen(f"{lab.url}/api/kernels?token={lab.token}", timeout=5) as r:
                kernels = json.load(r)
            for kernel in kernels:
                request = urllib.request.Request(
                    f"{lab.url}/api/kernels/{kernel['id']}?token={lab.token}", method="DELETE")
                urllib.request.urlopen(request, timeout=30).close()
        except OSError:
            pass  # the server is going anyway; its own shutdown stops the kernels it knows
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(lab.process.pid, sig)
        except ProcessLookupError:
            break
        try:
            lab.process.wait(timeout=30)
            break
        except subprocess.TimeoutExpired:
            continue
    lab.process.wait()


@pytest.fixture(scope="module")
def lab(quick_run, tmp_path_factory):
    """JupyterLab serving the quick run's folder; the run's metrics.json, which the notebook
    rewrites, is put back as run_all.sh wrote it when the server stops."""
    out, _ = quick_run
    metrics = (out / "metrics.json").read_bytes()
    started = start_lab(out, tmp_path_factory.mktemp("jupyter"))
    yield started
    stop_lab(started)
    (out / "metrics.json").write_bytes(metrics)


@pytest.fixture(scope="module")
def screenshots(quick_run) -> Path:
    folder = Path(os.environ.get("USAE_SCREENSHOTS") or quick_run[0] / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def kernel_error(frame: str) -> str:
    """A readable line for a websocket frame that carries a kernel error."""
    fields = {key: re.search(rf'"{key}":\s*"((?:[^"\\]|\\.)*)"', frame)
              for key in ("ename", "evalue")}
    if all(fields.values()):
        return f"kernel error: {fields['ename'][1]}: {fields['evalue'][1]}"
    start = frame.find("Traceback")  # on stderr: its text, without the colour codes
    return "kernel stderr: " + re.sub(r"\\u001b\[[\d;]*m", "", frame[max(start, 0):])[:2000]


class Watched(NamedTuple):
    page: object  # playwright.sync_api.Page
    errors: list  # what went wrong: page errors, console errors, kernel error messages


@pytest.fixture(scope="module")
def watched():
    """A chromium page (1600 x 1200) whose page errors, console errors and kernel error
    messages (read off its websockets) are collected in ``errors``."""
    errors = []

    def on_frame(payload) -> None:
        text = payload if isinstance(payload, str) else payload.decode("utf-8", "replace")
        if KERNEL_ERROR.search(text):
            errors.append(kernel_error(text))

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport=VIEWPORT)
        page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
        # every console error counts: JupyterLab 4.6 with this notebook logs none
        page.on("console", lambda m: m.type == "error"
                and errors.append(f"console: {m.text} ({m.location})"))
        page.on("websocket", lambda ws: ws.on("framereceived", on_frame))
        yield Watched(page, errors)
        browser.close()


# ---- reading and driving the page ---------------------------------------------------------------


def menu(page, top: str, item: str) -> None:
    """Click ``item`` of JupyterLab's ``top`` menu (e.g. "Run", "Run All Cells")."""
    page.locator(".lm-MenuBar-itemLabel").get_by_text(top, exact=True).click()
    page.locator(".lm-Menu-itemLabel").get_by_text(item, exact=True).click()


def check_clean(watched: Watched, step: str) -> None:
    """No error so far: none collected, and no cell output shows a traceback."""
    page = watched.page
    stderr = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
    failed = [text for text in stderr.all_inner_texts() if re.search(r"Traceback|\w+Error\b", text)]
    failed += page.get_by_text("Error displaying widget").all_inner_texts()
    assert not watched.errors and not failed, f"after {step}:\n" + "\n".join(
        watched.errors + failed)[-6000:]


def shoot(page, explorer, path: Path) -> None:
    """The page with the explorer's top at the top of the notebook, as ``path``."""
    explorer.evaluate("element => element.scrollIntoView({block: 'start'})")
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000, path


def shown_concept(panel) -> int:
    """The concept the concept tab shows, from its title ("concept 14  (energy rank 0): ...")."""
    title = texts(panel.get_by_text(re.compile(r"^concept \d+ .*firing entropy")))
    assert len(title) == 1, title
    return int(title[0].split()[1])


def texts(locator) -> list[str]:
    """The inner texts of ``locator``'s elements, white space (dropdowns use no-break spaces)
    made single spaces."""
    return [" ".join(text.split()) for text in locator.all_inner_texts()]


def option_id(label: str) -> int:
    """The concept of a concept dropdown label ("14 · rank 0 · energy 0.789")."""
    return int(label.split(" · ")[0])


def settle(page) -> None:
    """Wait until the kernel is idle: called once an action's first effect shows, it waits for
    the rest of what that action redraws (the kernel reports busy before its first update)."""
    page.get_by_text(re.compile(r"\| Idle$")).wait_for(timeout=WAIT_MS)


def title(concept: int) -> re.Pattern:
    """The concept tab's title of ``concept``."""
    return re.compile(rf"^concept {concept} .*firing entropy")


# ---- the steps ----------------------------------------------------------------------------------


def run_notebook(watched: Watched, lab: Lab):
    """Open notebook 06, clear its outputs, run all its cells; the explorer once shown."""
    page = watched.page
    page.goto(f"{lab.url}/lab/tree/{NOTEBOOK}?token={lab.token}")
    # the kernel is started and connected ("Python 3 (ipykernel) | Idle" in the status bar)
    page.get_by_text(re.compile(r"\| Idle$")).wait_for(timeout=RUN_MS)
    page.keyboard.press("Control+b")  # fold the file browser away: room for the explorer
    menu(page, "Edit", "Clear Outputs of All Cells")
    menu(page, "Run", "Run All Cells")
    # done when every code cell has its execution count again, or a cell failed
    page.wait_for_function("""() => {
        const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];
        const failed = [...document.querySelectorAll('.jp-OutputArea-output')]
            .some(output => output.textContent.includes('Traceback'));
        return failed || (prompts.length > 0
                          && prompts.every(p => /^\\[\\d+\\]:$/.test(p.textContent.trim())));
    }""", timeout=RUN_MS, polling=500)
    settle(page)
    check_clean(watched, "running all cells")
    explorer = page.locator(".widget-tab")  # the explorer: ipywidgets' Tab, the notebook's only
    sync_api.expect(explorer).to_be_visible()
    return explorer


def first_view(explorer) -> list[str]:
    """The concept tab shows the top concept by energy; returns the dropdown's labels."""
    expect = sync_api.expect
    expect(explorer.get_by_role("tab", name="concept")).to_have_attribute("aria-selected", "true")
    labels = texts(explorer.get_by_label("concept", exact=True).locator("option"))
    assert re.fullmatch(r"\d+ · rank 0 · energy \S+", labels[0]), labels[:3]
    assert shown_concept(explorer) == option_id(labels[0])
    assert explorer.locator("figcaption").count(), "no top image shown for the first concept"
    return labels


def concept_search(explorer, labels: list[str]) -> None:
    """An id typed into "find id" shows that concept, its images and its place in the dropdown;
    an id that is no concept is refused in words, and the shown concept stays."""
    expect, page = sync_api.expect, explorer.page
    captions = texts(explorer.locator("figcaption"))
    wanted = option_id(labels[5])
    search = explorer.get_by_placeholder("concept id, e.g. 801")
    search.fill(str(wanted))
    search.press("Enter")
    expect(explorer.get_by_text(title(wanted))).to_be_visible()
    settle(page)
    dropdown = explorer.get_by_label("concept", exact=True)
    expect(dropdown.locator("option:checked")).to_have_text(labels[5])
    # its own top images (each caption names an image and the concept's mean code on it)
    assert texts(explorer.locator("figcaption"))[0] != captions[0]
    search.fill("99999")
    search.press("Enter")
    expect(explorer.get_by_text(re.compile(r"\b99999\b")).first).to_be_visible()
    settle(page)
    assert shown_concept(explorer) == wanted


def sort_order(explorer, labels: list[str]) -> None:
    """Sorting model-unique first re-ranks the dropdown by rising firing entropy and shows the
    new first concept."""
    expect = sync_api.expect
    explorer.get_by_label("sort by").select_option("model-unique (low entropy)")
    dropdown = explorer.get_by_label("concept", exact=True)
    first = dropdown.locator("option").first  # \s: the options use no-break spaces
    expect(first).to_have_text(re.compile(r"^\d+\s·\srank\s0\s·\sentropy"))
    settle(explorer.page)
    unique = texts(dropdown.locator("option"))
    entropies = [float(label.rsplit(" ", 1)[1]) for label in unique[:20]]
    assert entropies == sorted(entropies) and unique[0] != labels[0], unique[:20]
    expect(explorer.get_by_text(title(option_id(unique[0])))).to_be_visible()
    expect(dropdown.locator("option:checked")).to_have_text(unique[0])


def image_picker(explorer) -> str:
    """In the image tab, "#7" in "find image" lists image 7 first; picking it shows the image,
    its own top concepts and their heatmaps on it. Returns its label."""
    expect, page = sync_api.expect, explorer.page
    explorer.get_by_role("tab", name="image").click()
    find = explorer.get_by_placeholder("label, e.g. dog, or #index")
    expect(find).to_be_visible()
    header = explorer.locator("b", has_text=re.compile(r"^#\d+ ")).first
    buttons = explorer.get_by_role("button", name=re.compile(r"^\d+ · "))  # concept · mean code
    before = texts(buttons)
    assert texts(header)[0].startswith("#0 ") and before, before
    find.fill("#7")
    find.press("Enter")
    listed = explorer.get_by_role("listbox")
    expect(listed.locator("option").first).to_have_text(re.compile(r"^#7\s"))
    label = texts(listed.locator("option").first)[0]
    listed.select_option(label=label)
    expect(header).to_have_text(label)
    settle(page)
    assert explorer.locator(f'img[title="{label}"]').count()
    after = texts(buttons)
    assert after and after != before, (before, after)
    # the heatmaps start with the image's top concept in its first model
    heat = explorer.locator("b", has_text=re.compile(r"^concept \d+$")).first
    expect(heat).to_have_text(f"concept {option_id(after[0])}")
    return label


def concept_button(explorer) -> None:
    """A concept button of the image tab opens that concept in the concept tab."""
    button = explorer.get_by_role("button", name=re.compile(r"^\d+ · ")).first
    concept = option_id(texts(button)[0])
    button.click()
    tab = explorer.get_by_role("tab", name="concept")
    sync_api.expect(tab).to_have_attribute("aria-selected", "true")
    sync_api.expect(explorer.get_by_text(title(concept))).to_be_visible()
    settle(explorer.page)


def translation(explorer, label: str) -> None:
    """The translation tab shows the picked image encoded with model A and decoded into B;
    choosing another A, then another B, redraws the text and the per-patch R² map."""
    expect = sync_api.expect
    explorer.get_by_role("tab", name="translation").click()
    names = texts(explorer.get_by_label("encode A").locator("option"))
    view = explorer.get_by_text(re.compile(r": encode with .* decode into "))

    def shows(source: str, target: str) -> None:
        expect(view).to_have_text(re.compile(
            rf"^{re.escape(label)}: encode with {re.escape(source)}, decode into "
            rf"{re.escape(target)} · image R² -?\d"))
        settle(explorer.page)

    r2_map = explorer.locator('img[title="per-patch R²"]')
    shows(names[0], names[-1])
    maps = [r2_map.get_attribute("src")]
    explorer.get_by_label("encode A").select_option(names[1])
    shows(names[1], names[-1])
    maps.append(r2_map.get_attribute("src"))
    explorer.get_by_label("decode B").select_option(names[0])
    shows(names[1], names[0])
    maps.append(r2_map.get_attribute("src"))
    assert len(set(maps)) == 3, "the per-patch R² map did not change with the models"


def test_explorer_in_jupyterlab_runs_and_every_control_changes_what_is_shown(
        lab, watched, screenshots):
    sync_api.expect.set_options(timeout=WAIT_MS)
    page = watched.page
    try:
        explorer = run_notebook(watched, lab)
        labels = first_view(explorer)
        shoot(page, explorer, screenshots / "01_notebook_run.png")
        concept_search(explorer, labels)
        shoot(page, explorer, screenshots / "02_concept_search.png")
        check_clean(watched, "the concept search")
        sort_order(explorer, labels)
        shoot(page, explorer, screenshots / "03_sort_order.png")
        check_clean(watched, "the sort order")
        label = image_picker(explorer)
        shoot(page, explorer, screenshots / "04_image_picker.png")
        check_clean(watched, "the image picker")
        concept_button(explorer)
        check_clean(watched, "a concept button")
        translation(explorer, label)
        shoot(page, explorer, screenshots / "05_translation.png")
        check_clean(watched, "the translation view")
    except Exception:
        page.screenshot(path=str(screenshots / "failed.png"))  # what the page showed then
        raise
