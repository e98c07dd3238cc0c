"""Browser tests of `honed ui` in a real Chromium: Debian's `chromium` and `chromium-driver`
packages driven by Selenium (nothing here downloads a browser: the driver's path is given, so
Selenium Manager is never asked). Skipped, with the reason, when either is missing.

The server is the real app under uvicorn on a free local port, over a copy of the session's
finished runs; the run launched from the form is a real background `honed run`."""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WIDTHS = {"desktop": (1280, 800), "phone": (390, 844)}

if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
    pytest.skip(f"browser tests need Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); "
                "install them with: apt-get install -y chromium chromium-driver", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="browser tests need selenium (pip install selenium)")
pytest.importorskip("uvicorn")

from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory, finished_runs, ui_files):
    """The UI under uvicorn in a thread, on 127.0.0.1 and a free port: (base URL, runs folder)."""
    import uvicorn

    from honed.serve.app import bind
    from honed.ui.app import create_app

    root = tmp_path_factory.mktemp("ui-browser") / "runs"
    shutil.copytree(finished_runs, root, symlinks=True)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(root, ui_files), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", root
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,800",
                 "--disable-extensions", "--no-first-run", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait(driver, condition, timeout=60.0, what="condition"):
    """Poll `condition` until it holds. A page that reloads while it is being read (the run page does
    when a run's state changes) leaves stale or missing elements for a moment: those polls count as
    "not yet", not as failures."""
    return WebDriverWait(driver, timeout, poll_frequency=0.2,
                         ignored_exceptions=(StaleElementReferenceException, NoSuchElementException)).until(
        lambda d: condition(d), message=f"timed out waiting for {what}")


def screenshot(driver, path: Path, size: tuple[int, int]) -> Path:
    """A screenshot at `size` (CSS pixels), checked to show something: not one flat colour."""
    from PIL import Image, ImageStat

    set_viewport(driver, size)
    driver.save_screenshot(str(path))
    image = Image.open(path).convert("L")
    spread = ImageStat.Stat(image).stddev[0]
    colours = len(Image.open(path).convert("RGB").getcolors(maxcolors=1 << 20) or [])
    assert spread > 10 and colours > 50, f"{path.name} looks blank (stddev {spread:.1f}, {colours} colours)"
    return path


def set_viewport(driver, size: tuple[int, int]) -> None:
    """The page's own viewport at exactly `size` (a phone width with touch and mobile layout)."""
    width, height = size
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})
    time.sleep(0.3)


def guard_badges(driver, scope: str) -> dict[str, str]:
    return {b.get_attribute("data-guard"): b.get_attribute("data-status")
            for b in driver.find_elements(By.CSS_SELECTOR, f"{scope} .badge[data-guard]")}


def test_runs_table_lists_the_fixture_runs(server, browser, tmp_path):
    base, root = server
    set_viewport(browser, WIDTHS["desktop"])
    browser.get(base + "/")
    wait(browser, lambda d: "updated" in d.find_element(By.ID, "refreshed").text, what="the table's refresh")
    names = [r.get_attribute("data-name") for r in browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")]
    assert {"mlp-a", "mlp-b"} <= set(names)
    row = browser.find_element(By.CSS_SELECTOR, '#runs tbody tr[data-name="mlp-a"]')
    metrics = json.loads((root / "mlp-a" / "metrics.json").read_text())
    badges = {b.get_attribute("data-guard"): b.text for b in row.find_elements(By.CSS_SELECTOR, ".badge")}
    assert badges == {g: f"{'✓' if s['status'] == 'ok' else {'warn': '!', 'fail': '✗', 'skipped': '–'}[s['status']]} {s['status']}"
                      for g, s in metrics["guards"].items()}
    assert f"{metrics['test']['accuracy']:.4f}" in row.text and "finished" in row.text
    # filter from the keyboard, then sort by name descending
    box = browser.find_element(By.ID, "filter")
    box.send_keys("mlp-b")
    wait(browser, lambda d: [r.get_attribute("data-name") for r in d.find_elements(By.CSS_SELECTOR, "#runs tbody tr")] == ["mlp-b"],
         what="the filter")
    box.clear()
    box.send_keys(" ")
    box.clear()
    sort = browser.find_element(By.CSS_SELECTOR, 'button.sort[data-key="name"]')
    sort.click()
    sort.click()
    shown = [r.get_attribute("data-name") for r in browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")]
    assert shown == sorted(shown, reverse=True)
    for label, size in WIDTHS.items():
        screenshot(browser, tmp_path / f"runs-{label}.png", size)
    print(f"screenshots: {tmp_path}")
    set_viewport(browser, WIDTHS["desktop"])


def fill_new_run(browser, base: str, name: str, epochs: int, eval_every: int) -> None:
    set_viewport(browser, WIDTHS["desktop"])
    browser.get(base + "/new")
    form = browser.find_element(By.ID, "form-recipe")
    form.find_element(By.ID, "f-name").send_keys(name)
    Select(form.find_element(By.ID, "f-task")).select_by_visible_text("tabular-classification")
    form.find_element(By.ID, "f-model").send_keys("mlp")
    Select(form.find_element(By.ID, "f-train")).select_by_visible_text("all.csv")
    wait(browser, lambda d: "mean_radius" in d.find_element(By.ID, "columns-note").text, what="the detected columns")
    form.find_element(By.ID, "f-features").send_keys("mean_radius,mean_texture,mean_perimeter,mean_area,worst_radius")
    form.find_element(By.ID, "f-label").send_keys("targte")  # a typo first: the check names the field
    form.find_element(By.ID, "f-epochs").send_keys(str(epochs))
    wait(browser, lambda d: "targte" in d.find_element(By.CSS_SELECTOR, '#form-recipe .field-error[data-for="data.label"]').text,
         what="the check's error beside the label field")
    label = form.find_element(By.ID, "f-label")
    label.clear()
    label.send_keys("target")
    form.find_element(By.ID, "f-batch").send_keys("32")
    form.find_element(By.ID, "f-lr").send_keys("0.003")
    form.find_element(By.ID, "f-overrides").send_keys(
        f"train.threads=1\ntrain.precision=fp32\ntrain.eval_every={eval_every}\ntrain.patience=null\nguards.baseline=false")
    wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#form-recipe .check-result").text.startswith("recipe ok"),
         what="the check to pass")
    form.find_element(By.CSS_SELECTOR, 'button[type="submit"]').click()


def state(browser) -> str:
    return browser.find_element(By.ID, "state").get_attribute("data-state")


@pytest.mark.slow  # two cold `honed run` starts in a real browser: ~80 s
def test_launch_from_the_form_stop_resume_finish(server, browser, tmp_path):
    """The form starts a real run; the page streams its progress; Stop interrupts it (SIGTERM,
    checkpoint); Resume finishes it; its badges are its metrics.json's."""
    base, root = server
    speed = json.loads((root / "mlp-a" / "metrics.json").read_text())["timing"]["samples_per_second"]
    rows = 455  # training rows once validation and test are carved out of the 569
    epochs = max(30, math.ceil(4 * speed / rows))  # about 4 s of training at the fixture run's speed (a launched run is slower)
    steps = epochs * math.ceil(rows / 32)
    fill_new_run(browser, base, "launched", epochs, eval_every=max(1, steps // 40))
    wait(browser, lambda d: d.current_url.endswith("/runs/launched"), what="the run page")
    wait(browser, lambda d: state(d) == "running", timeout=30, what="the launched run to show as running")
    wait(browser, lambda d: d.find_element(By.ID, "evaluations").text.isdigit() and int(d.find_element(By.ID, "evaluations").text) >= 1,
         timeout=90, what="the first evaluation streamed")
    first = int(browser.find_element(By.ID, "evaluations").text)
    assert browser.find_elements(By.CSS_SELECTOR, "#live-charts svg"), "live curves"
    assert browser.find_element(By.ID, "sps").text != "—"
    assert browser.find_element(By.ID, "phase").text.startswith("training")
    browser.find_element(By.ID, "stop").click()
    wait(browser, lambda d: state(d) == "interrupted", timeout=60, what="the run to stop")
    wait(browser, lambda d: not d.find_element(By.ID, "stop").is_enabled(), what="the page to reload without Stop")
    assert "interrupted: checkpoint saved" in (root / "launched" / "run.log").read_text()
    assert not (root / "launched" / "metrics.json").exists()
    stopped_at = len((root / "launched" / "history.jsonl").read_text().splitlines())
    assert stopped_at >= first and stopped_at < 40
    wait(browser, lambda d: d.find_element(By.ID, "resume").is_enabled(), what="the reloaded page's Resume button")
    browser.find_element(By.ID, "resume").click()
    wait(browser, lambda d: state(d) == "running", timeout=30, what="the resumed run")
    wait(browser, lambda d: state(d) == "finished", timeout=180, what="the resumed run to finish")
    wait(browser, lambda d: d.find_elements(By.ID, "report-frame"), what="the report")
    metrics = json.loads((root / "launched" / "metrics.json").read_text())
    assert guard_badges(browser, "#verdict-badges") == {g: s["status"] for g, s in metrics["guards"].items()}
    assert browser.find_element(By.ID, "test-metric").text == f"{metrics['test']['accuracy']:.4f}"
    history = (root / "launched" / "history.jsonl").read_text().splitlines()
    assert len(history) > stopped_at  # the resumed run went on from the checkpoint
    browser.get(base + "/")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#runs tbody tr[data-name="launched"][data-state="finished"]'),
         what="the runs table to show it finished")
    browser.get(base + "/runs/launched")
    for label, size in WIDTHS.items():
        screenshot(browser, tmp_path / f"run-{label}.png", size)


def test_compare_shows_the_keys_that_differ(server, browser, tmp_path):
    base, _ = server
    set_viewport(browser, WIDTHS["desktop"])
    browser.get(base + "/")
    wait(browser, lambda d: "updated" in d.find_element(By.ID, "refreshed").text, what="the table's refresh")
    for name in ("mlp-a", "mlp-b"):
        browser.find_element(By.CSS_SELECTOR, f'#runs tbody tr[data-name="{name}"] input.pick').click()
    button = browser.find_element(By.ID, "compare-selected")
    assert button.is_enabled()
    button.click()
    wait(browser, lambda d: d.find_elements(By.ID, "differences"), what="the compare page")
    keys = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#differences tbody th code")]
    assert keys == ["model.hidden", "train.lr"]
    assert len(browser.find_elements(By.CSS_SELECTOR, ".verdict-card")) == 2
    assert browser.find_elements(By.CSS_SELECTOR, ".charts svg")
    for label, size in WIDTHS.items():
        screenshot(browser, tmp_path / f"compare-{label}.png", size)
