"""`dvc plots show` draws every training curve of dvc.yaml's `plots:` offline, in a real headless Chromium.

The project copy gets hand-written history.jsonl files (the trainer's row format: train/* rows every few steps,
val/* rows at each evaluation) turned into curves.json by tasks/common/curves.py, as the training stages do; DVC
renders them with the template `make install` built (.dvc/config: plots.html_template); Chromium opens the page
with every network request refused. The same page built with DVC's own (CDN) template draws nothing there, which
shows the browser really was offline. Skipped, naming what is missing, without chromium, chromedriver or selenium.
"""

from __future__ import annotations

import configparser
import contextlib
import json
import math
import re
import sys
from pathlib import Path

import pytest
import yaml

from flows.sandbox import copy_project
from tasks.common.config import ROOT
from tasks.common.curves import CURVES_FILE, curve_rows, read_history, write_curves
from tests.conftest import run_in

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
TRAINING = ["pretrain", "sft", "reward", "dpo", "ppo"]
TRAIN_KEYS = {  # what each stage's recipe adds to the trainer's train/loss, train/lr, ... (tasks/<stage>.py)
    "pretrain": [],
    "sft": [],
    "reward": ["accuracy", "margin"],
    "dpo": ["accuracy", "margin", "rewards_chosen", "rewards_rejected", "dpo_loss"],
    "ppo": ["reward", "checker", "kl", "kl_coef", "entropy", "response_length"],
}
VAL_KEYS = {
    "pretrain": ["loss", "bpb"],
    "sft": ["loss"],
    "reward": ["loss", "accuracy", "margin"],
    "dpo": ["loss", "accuracy", "margin", "kl"],
    "ppo": ["checker", "satisfaction", "response_length"],
}


def history_rows(stage: str, steps: int = 40, log_every: int = 4, eval_every: int = 20) -> list[dict]:
    """A history.jsonl as the trainer writes it: a train row every `log_every` steps, a val row per evaluation."""
    rows = []
    for step in range(log_every, steps + 1, log_every):
        decay = 3.0 * math.exp(-step / 15) + 0.5
        extra = {f"train/{k}": decay * (i + 1) for i, k in enumerate(TRAIN_KEYS[stage])}
        rows.append(
            {
                "step": step,
                "tokens": step * 512,
                "train/loss": decay,
                "train/lr": 1e-3 * min(1.0, step / 10),
                "train/grad_norm": 1.0,
                "train/tokens_per_s": 5000.0,
                **extra,
            }
        )
        if step % eval_every == 0:
            rows.append({"step": step, "tokens": step * 512, **{f"val/{k}": decay + 0.1 for k in VAL_KEYS[stage]}})
    return rows


# ------------------------------------------------------------------------------------------------ curves.json


def test_curve_rows_give_every_row_every_key_with_nulls():
    rows = [
        {"step": 20, "tokens": 80, "val/loss": 1.5, "val/by_kind": {"a": 1.0}},
        {"step": 10, "tokens": 40, "train/loss": 2.0, "train/lr": 1e-3, "note": "text"},
        {"step": 20, "tokens": 80, "train/loss": float("nan"), "train/lr": 1e-3},
    ]
    got = curve_rows(rows)
    assert [list(r) for r in got] == [["step", "tokens", "train/loss", "train/lr", "val/loss"]] * 3
    assert got[0] == {"step": 10, "tokens": 40, "train/loss": 2.0, "train/lr": 1e-3, "val/loss": None}
    assert got[1]["val/loss"] == 1.5 and got[1]["train/loss"] is None  # rows of one step keep their order
    assert got[2]["train/loss"] is None  # NaN is not JSON: null, left out of the line


def test_write_curves_is_a_json_list_dvc_takes_as_data(tmp_path):
    from dvc.render.converter.vega import get_datapoints

    history = tmp_path / "history.jsonl"
    rows = history_rows("dpo")
    history.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    out = write_curves(history)
    assert out == tmp_path / CURVES_FILE
    data = json.loads(out.read_text())
    assert len(data) == len(rows) and get_datapoints(data) == data  # DVC drops a list whose rows differ in keys
    assert get_datapoints(rows) == []  # ... as the raw history's would be


def test_a_bad_history_line_names_file_and_line(tmp_path):
    history = tmp_path / "history.jsonl"
    history.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"history.jsonl:2: a row must be a JSON object"):
        read_history(history)


def test_dvc_yaml_plots_read_the_training_stages_curves():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    files = {f for plot in spec["plots"] for props in plot.values() for f in props["y"]}
    assert files == {f"data/{s}/{CURVES_FILE}" for s in TRAINING}
    for plot in spec["plots"]:
        (name, props), *_ = plot.items()
        assert props["x"] == "step" and props.get("title") and props.get("y_label"), name
    for stage in TRAINING:  # every field a plot names is one the stage's history has
        keys = set(curve_rows(history_rows(stage))[0])
        named = {f for plot in spec["plots"] for props in plot.values() for f in _fields(props, stage)}
        assert named and named <= keys, (stage, named - keys)


def _fields(props: dict, stage: str) -> list[str]:
    fields = props["y"].get(f"data/{stage}/{CURVES_FILE}", [])
    return [fields] if isinstance(fields, str) else fields


def test_dvc_config_names_the_template_make_install_builds():
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    template = (ROOT / ".dvc" / config["plots"]["html_template"]).resolve()
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^PLOTS_TEMPLATE := \$\(VENV\)/share/scratchlm/dvc_plots\.html$", make, re.M)
    assert template == (ROOT / ".venv" / "share" / "scratchlm" / "dvc_plots.html").resolve()
    assert re.search(r"^install: .*\$\(PLOTS_TEMPLATE\)", make, re.M)


# ------------------------------------------------------------------------------------------------ the page


def browser_or_skip():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        pytest.skip(f"no headless browser to render the plots page: {', '.join(missing)} missing")


def installed_template() -> Path:
    """The template .dvc/config names, for this venv; skipped when it is DVC's online page (no npm at install)."""
    template = Path(sys.prefix) / "share" / "scratchlm" / "dvc_plots.html"
    if not template.is_file():
        pytest.fail(f"{template} is missing: `make install` (or `make plots-template`) builds it")
    if "inlined (offline)" not in template.read_text(encoding="utf-8")[:300]:
        pytest.skip(f"{template} is DVC's online page: npm was missing at `make install`")
    return template


@pytest.fixture(scope="module")
def plots_project(tmp_path_factory) -> Path:
    browser_or_skip()
    template = installed_template()
    project = copy_project(tmp_path_factory.mktemp("plots") / "project")
    (project / ".venv").symlink_to(template.parents[2], target_is_directory=True)  # .dvc/config: ../.venv/...
    for stage in TRAINING:
        history = project / "data" / stage / "history.jsonl"
        history.parent.mkdir(parents=True)
        history.write_text("".join(json.dumps(r) + "\n" for r in history_rows(stage)))
        write_curves(history)
    return project


def plot_specs(page: Path) -> list[dict]:
    """The vega-lite specs DVC embedded in the page, in order."""
    html = page.read_text(encoding="utf-8")
    return [json.loads(m) for m in re.findall(r"var spec = (\{.*?\});\n\s*vegaEmbed", html, re.S)]


def chromium(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--proxy-server=http://127.0.0.1:9",  # every http(s) request goes to a closed port: offline
        "--proxy-bypass-list=<-loopback>",
        "--host-resolver-rules=MAP * ~NOTFOUND",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


DRAWN = """
return Array.from(document.querySelectorAll('.vega-embed canvas')).map(c => {
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let inked = 0;
  for (let i = 3; i < d.length; i += 4) if (d[i] > 0) inked++;
  return inked;
});
"""


def render(page: Path, profile: Path, expected: int, wait_s: float = 30) -> tuple[list[int], list[str], bool]:
    """(inked pixels per chart, severe console messages, vegaEmbed defined) once `expected` charts are drawn or
    `wait_s` have passed."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium(profile)
    try:
        driver.get(page.as_uri())
        with contextlib.suppress(TimeoutException):  # fewer drawn: the caller's assertions say how many
            WebDriverWait(driver, wait_s).until(lambda d: len(d.execute_script(DRAWN)) >= expected)
        inked = driver.execute_script(DRAWN)
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        embed = driver.execute_script("return typeof vegaEmbed === 'function'")
    finally:
        driver.quit()
    return inked, errors, embed


def test_plots_page_draws_every_curve_offline(plots_project, tmp_path):
    shown = run_in(plots_project, "dvc", "plots", "show", timeout=120)
    assert shown.returncode == 0, shown.stderr + shown.stdout
    assert "failed to load" not in shown.stdout + shown.stderr
    page = plots_project / "dvc_plots" / "index.html"
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]+src=", html)  # nothing to load: vega & co are in the page
    specs = {s["title"]["text"]: s for s in plot_specs(page)}
    declared = yaml.safe_load((plots_project / "dvc.yaml").read_text())["plots"]
    for props in (props for plot in declared for props in plot.values()):  # each curve is there, with its points
        assert props["title"] in specs, f"plot {props['title']!r} is not on the page"
        values = specs[props["title"]]["data"]["values"]
        for file, fields in props["y"].items():
            for field in [fields] if isinstance(fields, str) else fields:
                points = [v for v in values if v.get("field", field) == field and v.get(field) is not None]
                assert len(points) >= 2, (props["title"], file, field)

    inked, errors, embed = render(page, tmp_path / "profile", len(specs))
    assert embed and not errors, errors
    assert len(inked) == len(specs), f"{len(inked)} of {len(specs)} charts drawn"
    assert min(inked) > 5000, inked  # axes, labels and lines: a blank canvas has 0

    # control: DVC's own page (vega from its CDN) draws nothing in this browser, so the one above was offline
    online = run_in(
        plots_project, "dvc", "plots", "show", "-o", "online_plots", "--html-template", str(online_page(tmp_path))
    )
    assert online.returncode == 0, online.stderr
    inked, errors, embed = render(plots_project / "online_plots" / "index.html", tmp_path / "profile2", 1, wait_s=3)
    assert inked == [] and not embed


def online_page(tmp_path: Path) -> Path:
    sys.path.insert(0, str(ROOT / "infra" / "dvc_plots"))
    try:
        from build_template import online_page as page
    finally:
        sys.path.remove(str(ROOT / "infra" / "dvc_plots"))
    out = tmp_path / "online.html"
    out.write_text(page())
    return out


def test_the_template_escapes_script_ends_and_keeps_dvc_placeholders():
    sys.path.insert(0, str(ROOT / "infra" / "dvc_plots"))
    try:
        import build_template
    finally:
        sys.path.remove(str(ROOT / "infra" / "dvc_plots"))
    page = build_template.offline_page({name: "var x = '</script>';" for name in build_template.PACKAGES})
    assert "</script>'" not in page and "<\\/script>'" in page
    assert page.count("{plot_divs}") == 1 and "{scripts}" not in page
    with pytest.raises(ValueError, match="placeholder"):
        build_template.offline_page({"vega": "{plot_divs}", "vega-lite": "", "vega-embed": ""})
