"""The web page of `scratchlm serve` in a real headless Chromium (Debian's /usr/bin/chromium + chromedriver, driven
by Selenium): it loads nothing from the network, chats with a streamed reply, and rates arena battles into the
preference files; the reward stage then trains on the rated pairs, and its counts and metrics change.

The person in the arena is played by the builtin answer checker: for each builtin "test" instruction, the answer
meeting more of its constraints wins, equal scores are a tie (both meet none: both bad). So which choice is made is
decided by the answers the page shows, not by the test.

    SCRATCHLM_SCREENSHOTS=docs .venv/bin/python -m pytest -q tests/test_serve_web.py   # also refreshes docs/*.png
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tasks.sources import builtin
from tests.serve_fixtures import serve_world, serving

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1100,1000",
]
BATTLES = 12
WAIT = 120  # seconds a reply may take on a loaded 2-core machine


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def session(browser, tmp_path_factory):
    """The page after a chat and BATTLES rated battles: (running server, feedback folder, what the page showed)."""
    world = serve_world(tmp_path_factory)
    feedback = tmp_path_factory.mktemp("feedback")
    with serving(world, feedback) as running:
        browser.get(running.url + "/")
        chat = chat_twice(browser)
        shoot(browser, tmp_path_factory, "serve_chat.png")
        shown = rate_battles(browser)
        shoot(browser, tmp_path_factory, "serve_arena.png")
        resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        yield running, feedback, {"chat": chat, "battles": shown, "resources": resources}


def wait(driver, condition, timeout: float = WAIT):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def text_of(element) -> str:
    return element.get_attribute("textContent")  # exactly as set (Selenium's .text normalises whitespace)


def chat_twice(driver) -> list[str]:
    """Two turns in the chat tab; the assistant's replies as the page shows them."""
    from selenium.webdriver.common.by import By

    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-model option"))
    replies = []
    for turn, message in enumerate(["Tell me a story about a cat.", "And one about a dog?"]):
        driver.find_element(By.ID, "chat-input").send_keys(message)
        driver.find_element(By.ID, "chat-send").click()
        done = f"#chat-log .msg.assistant:nth-of-type({2 * turn + 2})[data-state=done]"
        wait(driver, lambda d, css=done: d.find_elements(By.CSS_SELECTOR, css))
        replies.append(text_of(driver.find_elements(By.CSS_SELECTOR, "#chat-log .msg.assistant .body")[-1]))
    assert text_of(driver.find_element(By.ID, "chat-status")) == ""  # no error shown
    return replies


def judge(a: str, b: str, constraints: dict) -> str:
    """The checker as the rater: the answer meeting more constraints; a tie on equal scores, both bad at zero."""
    score_a, score_b = (builtin.check_constraints(t.strip(), constraints)["score"] for t in (a, b))
    if score_a != score_b:
        return "A" if score_a > score_b else "B"
    return "both_bad" if score_a == 0 else "tie"


def rate_battles(driver) -> list[dict]:
    """BATTLES prompts through the arena tab, each rated by `judge`; what was shown and chosen."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "tab-arena").click()
    driver.find_element(By.ID, "arena-max-tokens").clear()
    driver.find_element(By.ID, "arena-max-tokens").send_keys("120")
    shown = []
    for example in builtin.generate_instructions(BATTLES, 5, "test"):
        prompt = example["messages"][0]["content"]
        box = driver.find_element(By.ID, "arena-prompt")
        box.clear()
        box.send_keys(prompt)
        driver.find_element(By.ID, "arena-ask").click()
        wait(driver, lambda d: d.find_element(By.ID, "vote-A").is_enabled())
        assert text_of(driver.find_element(By.ID, "arena-result")) == ""  # blind: no model named before the vote
        a, b = (text_of(driver.find_element(By.CSS_SELECTOR, f"#answer-{s} .text")) for s in "ab")
        choice = judge(a, b, example["constraints"])
        driver.find_element(By.ID, f"vote-{choice}").click()
        wait(driver, lambda d: text_of(d.find_element(By.ID, "arena-result")).startswith("A was"))
        revealed = text_of(driver.find_element(By.ID, "arena-result"))
        shown.append({"prompt": prompt, "a": a, "b": b, "choice": choice, "revealed": revealed})
    return shown


def shoot(driver, tmp_path_factory, name: str) -> None:
    """A screenshot in the test's temp folder, and in $SCRATCHLM_SCREENSHOTS (e.g. docs) when set."""
    path = tmp_path_factory.getbasetemp() / name
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    if os.environ.get("SCRATCHLM_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["SCRATCHLM_SCREENSHOTS"]) / name)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_the_page_loads_nothing_from_the_network(session):
    running, _, shown = session
    assert shown["resources"] and all(r.startswith(running.url + "/") for r in shown["resources"])
    page = httpx.get(running.url + "/").text
    assert "http://" not in page and "https://" not in page and "src=" not in page.replace("data-src", "")


def test_chat_streams_replies_into_the_page(session):
    running, _, shown = session
    assert all(reply.strip() for reply in shown["chat"]), shown["chat"]
    engine = next(iter(running.server.engines.values()))
    assert engine.stats["rows"] >= 2  # the replies came from the champion


def test_ratings_go_to_the_preference_files(session):
    running, feedback, shown = session
    ratings = read_jsonl(feedback / "ratings.jsonl")[:BATTLES]  # (the next test adds ties of its own)
    pairs = read_jsonl(feedback / "preferences.jsonl")
    assert [r["choice"] for r in ratings] == [s["choice"] for s in shown["battles"]]
    expected_pairs = []
    for rating, seen in zip(ratings, shown["battles"]):
        assert (rating["prompt"], rating["a"]["text"], rating["b"]["text"]) == (seen["prompt"], seen["a"], seen["b"])
        assert seen["revealed"].startswith(f"A was {rating['a']['model']}, B was {rating['b']['model']}.")
        assert {rating["a"]["model"], rating["b"]["model"]} == set(running.server.engines)
        if seen["choice"] in ("A", "B") and seen["a"] != seen["b"] and seen["a"].strip() and seen["b"].strip():
            win, lose = (seen["a"], seen["b"]) if seen["choice"] == "A" else (seen["b"], seen["a"])
            expected_pairs.append({"prompt": seen["prompt"], "chosen": win, "rejected": lose})
            assert rating["recorded"] == "pair"
        else:
            assert rating["recorded"] == "rating" and rating["why"]
    assert [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs] == expected_pairs
    # how many battles end in A or B between two different answers depends on what the tiny models sample (float
    # rounding moves it between machines: 3 to 7 of 12 seen); every one of them must be a pair, and there is one
    assert pairs, [s["choice"] for s in shown["battles"]]
    info = httpx.get(running.url + "/arena/info").json()
    assert info["counts"]["pairs"] == len(pairs) and info["counts"]["ratings"] >= BATTLES


def test_the_arena_draws_the_order_per_battle_and_rates_once(session):
    running, _, _ = session
    orders = set()
    for _ in range(24):  # one-token answers: the order, not the text, is under test
        battle = httpx.post(running.url + "/arena/battle", json={"prompt": "Hi!", "max_tokens": 1}).json()
        assert set(battle) == {"battle", "a", "b"}  # no model named
        vote = httpx.post(running.url + "/arena/vote", json={"battle": battle["battle"], "choice": "tie"}).json()
        orders.add((vote["models"]["A"], vote["models"]["B"]))
        again = httpx.post(running.url + "/arena/vote", json={"battle": battle["battle"], "choice": "A"})
        assert again.status_code == 404 and "already rated" in again.json()["error"]["message"]
    assert len(orders) == 2  # both orders drawn (each battle: 1/2)
    bad = httpx.post(running.url + "/arena/vote", json={"battle": "x", "choice": "maybe"})
    assert bad.status_code == 400 and "choice" in bad.json()["error"]["message"]


@pytest.mark.slow
def test_rated_pairs_retrain_the_reward_model(session, tmp_path):
    """The reward stage on builtin pairs, then on builtin + the page's pairs: counts and metrics (printed with -s)."""
    from tasks.common.train_config import TrainConfig
    from tests.alignment_fixtures import reward_config, run_stage

    running, feedback, _ = session
    world = next(iter(running.server.engines.values())).folder.parent
    pairs = read_jsonl(feedback / "preferences.jsonl")
    train = TrainConfig(max_steps=8, batch_size=8, micro_batch_size=8, lr=1e-3, warmup_steps=1, log_every=4)
    results = {}
    for name, sources in (
        ("builtin", ["builtin:preferences"]),
        ("builtin + arena", ["builtin:preferences", "feedback/preferences.jsonl"]),
    ):
        root = tmp_path / name.replace(" + ", "_")
        (root / "data" / "sft").mkdir(parents=True)
        (root / "data" / "sft" / "model").symlink_to(world / "champion")
        (root / "data" / "tokenizer").symlink_to(world / "tokenizer")
        (root / "feedback").mkdir()
        shutil.copy(feedback / "preferences.jsonl", root / "feedback" / "preferences.jsonl")
        cfg = reward_config(sources=sources, builtin_train=48, builtin_val=24, train=train)
        results[name] = run_stage("reward", cfg, root)
    before, after = results["builtin"], results["builtin + arena"]
    arena = after["per_source"]["feedback/preferences.jsonl"]
    assert arena["train"] + arena["val"] == len(pairs) and arena["quarantined"] == 0
    assert after["rows_in"] == before["rows_in"] + len(pairs)
    assert after["train_examples"] == before["train_examples"] + arena["train"]
    changed = [k for k in ("train_loss", "accuracy", "margin") if after[k] != before[k]]
    assert changed, {k: (before[k], after[k]) for k in ("train_loss", "accuracy", "margin")}
    choices = Counter(r["choice"] for r in read_jsonl(feedback / "ratings.jsonl")[:BATTLES])
    print(f"\n{BATTLES} battles rated {dict(choices)}: {len(pairs)} pairs ({arena['train']} train, {arena['val']} val)")
    for key in ("rows_in", "train_examples", "val_examples", "quarantined", "train_loss", "accuracy", "margin"):
        print(f"  {key:<15} {before[key]!s:>22} -> {after[key]!s:<22}")


def test_the_rated_files_are_versioned_with_dvc(session, tmp_path):
    """What `scratchlm serve` does when it stops after ratings: `dvc add` both files, a new version per session."""
    import hashlib
    import subprocess
    import sys

    import yaml

    from flows.arena import version_with_dvc

    _, feedback, _ = session
    project = tmp_path / "project"
    (project / "feedback").mkdir(parents=True)
    dvc = str(Path(sys.executable).parent / "dvc")
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"]):
        subprocess.run(cmd, cwd=project, check=True, capture_output=True)
    files = [project / "feedback" / name for name in ("preferences.jsonl", "ratings.jsonl")]
    for f in files:
        shutil.copy(feedback / f.name, f)

    def recorded(f: Path) -> str:
        return yaml.safe_load(f.with_name(f.name + ".dvc").read_text())["outs"][0]["md5"]

    said = version_with_dvc(files)
    assert said[0].startswith("  versioned with DVC: feedback/preferences.jsonl.dvc feedback/ratings.jsonl.dvc")
    assert [recorded(f) for f in files] == [hashlib.md5(f.read_bytes()).hexdigest() for f in files]
    assert "/preferences.jsonl" in (project / "feedback" / ".gitignore").read_text()  # the data is DVC's, not git's
    first = recorded(files[0])
    with open(files[0], "a") as f:
        f.write(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    version_with_dvc(files)
    assert recorded(files[0]) != first and recorded(files[0]) == hashlib.md5(files[0].read_bytes()).hexdigest()
    assert "no DVC repository" in version_with_dvc([feedback / "ratings.jsonl"])[0]
