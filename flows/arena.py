"""The arena of `scratchlm serve`: two models answer one prompt, shown blind in random order; a person's choice
becomes a preference pair the reward, dpo and ppo stages can train on.

    POST /arena/battle {"prompt": "...", "max_tokens": 160, "temperature": 0.8, "seed": 0}
        -> {"battle": "9f1c...", "a": "<answer>", "b": "<answer>"}     which model is A is drawn per battle
    POST /arena/vote {"battle": "9f1c...", "choice": "A" | "B" | "tie" | "both_bad"}
        -> {"recorded": "pair" | "rating", "why": ..., "models": {"A": id, "B": id}, "counts": {...}}
    GET  /arena/info -> whether the arena is on, where its files are, their counts

Files (in --feedback, default feedback/ in the project):
    ratings.jsonl      every rating: {time, battle, prompt, settings, a: {model, text}, b: {model, text}, choice,
                       recorded, why}. The whole record, ties and both-bad included.
    preferences.jsonl  one {prompt, chosen, rejected, battle} per A or B choice: the contract of `reward.sources`,
                       `dpo.sources` (tasks/sources/instructions.py: to_preference) and `ppo.sources` (its `prompt`
                       becomes a training prompt). A tie or both-bad says neither answer is better, so it is no pair
                       (a Bradley-Terry or DPO loss has no term for it): it stays in ratings.jsonl only. A choice
                       between two identical or empty answers is no pair either (the stages would quarantine it).
Versioned with DVC: when `scratchlm serve` stops after a session with ratings, it runs `dvc add` on both files
(`version_with_dvc`; --no-dvc skips it), so feedback/preferences.jsonl.dvc and feedback/ratings.jsonl.dvc name this
version of the ratings (git add + commit them; `dvc push` sends the data to a remote). Train on them:
    dvc exp run -S 'reward.sources=[builtin:preferences,feedback/preferences.jsonl]'     (dpo.sources alike)
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

CHOICES = ("A", "B", "tie", "both_bad")
SETTINGS = {"max_tokens": 160, "temperature": 0.8, "top_p": 0.95, "seed": None}
"""A battle's generation settings and their defaults (POST /arena/battle may set each)."""
KEEP_BATTLES = 1000
"""Unrated battles kept in memory (the oldest are forgotten first)."""


class ArenaError(Exception):
    """A battle or vote the arena refuses: HTTP `status` (flows/serve.py answers with OpenAI's error JSON)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


Answer = Callable[[str, str, dict], Awaitable[str]]
"""answer(model id, prompt, settings) -> the model's reply to a one-turn chat (flows/serve.py: Server.answer)."""


class Arena:
    """Battles between two served models and the files the votes go to."""

    def __init__(self, ids: list[str], folder: Path, answer: Answer) -> None:
        self.ids, self.folder, self.answer = ids, Path(folder), answer
        self.battles: dict[str, dict] = {}
        self.rng = random.SystemRandom()
        self.lock = threading.Lock()
        self.session = Counter()

    @property
    def preferences(self) -> Path:
        return self.folder / "preferences.jsonl"

    @property
    def ratings(self) -> Path:
        return self.folder / "ratings.jsonl"

    def counts(self) -> dict:
        """Pairs in preferences.jsonl, ratings in ratings.jsonl and the ratings by choice."""
        rows = read_jsonl(self.ratings)
        return {
            "pairs": len(read_jsonl(self.preferences)),
            "ratings": len(rows),
            "by_choice": dict(Counter(r.get("choice") for r in rows)),
        }

    async def battle(self, prompt: str, max_tokens: int, temperature: float, top_p: float, seed: int | None) -> dict:
        """Both models' answers to `prompt`, in a random order, under a new battle id."""
        if len(self.ids) != 2:
            raise ArenaError(409, "the arena needs two served models (scratchlm serve --model A --model B)")
        if not prompt.strip():
            raise ArenaError(400, "prompt: write something for the models to answer", "prompt")
        order = self.rng.sample(self.ids, 2)
        settings = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
        answers = await asyncio.gather(*(self.answer(m, prompt, settings) for m in order))
        battle = secrets.token_hex(8)
        self.battles[battle] = {"prompt": prompt, "models": order, "answers": answers, "settings": settings}
        while len(self.battles) > KEEP_BATTLES:
            self.battles.pop(next(iter(self.battles)))
        return {"battle": battle, "a": answers[0], "b": answers[1]}

    def vote(self, battle_id: str, choice: str) -> dict:
        """Record `choice` on a battle (once): a ratings.jsonl row, and a preferences.jsonl pair for A or B."""
        if choice not in CHOICES:
            raise ArenaError(400, f"choice: one of {', '.join(CHOICES)}, got {choice!r}", "choice")
        battle = self.battles.pop(battle_id, None)
        if battle is None:
            raise ArenaError(404, f"battle {battle_id!r}: unknown or already rated", "battle")
        (a, b), (model_a, model_b) = battle["answers"], battle["models"]
        pair, why = None, None
        if choice in ("A", "B"):
            chosen, rejected = (a, b) if choice == "A" else (b, a)
            why = pair_problem(chosen, rejected)
            if why is None:
                pair = {"prompt": battle["prompt"], "chosen": chosen, "rejected": rejected, "battle": battle_id}
        else:
            why = f"a {choice.replace('_', '-')} is no preference pair"
        rating = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "battle": battle_id,
            "prompt": battle["prompt"],
            "settings": battle["settings"],
            "a": {"model": model_a, "text": a},
            "b": {"model": model_b, "text": b},
            "choice": choice,
            "recorded": "pair" if pair else "rating",
            "why": why,
        }
        with self.lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            append_jsonl(self.ratings, rating)
            if pair:
                append_jsonl(self.preferences, pair)
            self.session["ratings"] += 1
            self.session["pairs"] += pair is not None
        return {"recorded": rating["recorded"], "why": why, "models": {"A": model_a, "B": model_b}, **self.info()}

    def info(self) -> dict:
        return {
            "enabled": len(self.ids) == 2,
            "files": {"preferences": str(self.preferences), "ratings": str(self.ratings)},
            "counts": self.counts(),
        }

    def closing_lines(self, dvc: bool = True) -> list[str]:
        """What `scratchlm serve` does and prints when it stops after ratings: version the files with DVC (unless
        `dvc` is False), and how to train on them."""
        if not self.session["ratings"]:
            return []
        files = [self.preferences, self.ratings]
        lines = [
            f"arena: {self.session['ratings']} ratings this session ({self.session['pairs']} preference pairs) "
            f"in {shown_path(self.folder)}/"
        ]
        if dvc:
            lines += version_with_dvc(files)
        else:
            lines.append(f"  version them: dvc add {' '.join(shown_path(p) for p in files)}")
        train = f"dvc exp run -S 'reward.sources=[builtin:preferences,{shown_path(self.preferences)}]'"
        return lines + [f"  train on them: {train}"]


def pair_problem(chosen: str, rejected: str) -> str | None:
    """Why two answers make no training pair (the preference reader would quarantine them), or None."""
    if not chosen.strip() or not rejected.strip():
        return "an empty answer makes no preference pair"
    if chosen == rejected:
        return "identical answers make no preference pair"
    return None


def version_with_dvc(files: list[Path]) -> list[str]:
    """`dvc add` the files in the DVC repository that holds them; lines saying what happened (never raises)."""
    import subprocess
    import sys

    files = [Path(f).resolve() for f in files if Path(f).is_file()]
    repo = next((p for p in files[0].parents if (p / ".dvc").is_dir()), None) if files else None
    if repo is None:
        return [f"  not versioned: {', '.join(map(str, files)) or '(no files)'} are in no DVC repository"]
    rel = [str(f.relative_to(repo)) for f in files]
    dvc = Path(sys.executable).parent / "dvc"
    try:
        done = subprocess.run(
            [str(dvc) if dvc.is_file() else "dvc", "add", "-q", *rel], cwd=repo, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        failed = done.returncode != 0 and (done.stderr.strip().splitlines() or ["failed"])[-1]
    except (OSError, subprocess.TimeoutExpired) as e:
        failed = str(e)
    if failed:
        return [f"  dvc add failed ({failed}); version them by hand: cd {repo} && dvc add {' '.join(rel)}"]
    tracked = " ".join(f"{r}.dvc" for r in rel)
    return [f"  versioned with DVC: {tracked} (commit them: git add {tracked} {Path(rel[0]).parent}/.gitignore)"]


def append_jsonl(path: Path, row: dict) -> None:
    """Append one JSON line and flush it to disk (a killed server loses no rating it acknowledged)."""
    import os

    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def shown_path(path: Path) -> str:
    from tasks.common.config import ROOT

    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
