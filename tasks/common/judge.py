"""LLM-as-judge: verdicts on two models' answers, each pair judged in both orders, calibrated against the builtin
constraint checker. Pairwise (the judge sees both answers) or pointwise (it grades each answer alone).

Runbook
    evaluate.judge in params.yaml (the evaluate stage runs it on the answers it sampled; metrics/all/evaluate.json
    `judge`, the verdicts in data/evaluate/judge/<x>_vs_<y>.jsonl):
        dvc exp run -S evaluate.judge.model=dpo                        # the DPO policy judges every pair
        dvc exp run -S evaluate.judge.model=/path/to/hf-folder         # any HF Llama folder with its tokenizer
        dvc exp run -S evaluate.judge.model=models:/scratchlm@champion # a registered model
        dvc exp run -S evaluate.judge.backend=endpoint \\
            -S evaluate.judge.endpoint.base_url=http://127.0.0.1:8000/v1 -S evaluate.judge.endpoint.model=m
                                                                        # vLLM, `scratchlm serve`, a hosted model
        dvc exp run -S evaluate.judge.write_preferences=true            # feedback/judge_preferences.jsonl
        dvc exp run -S evaluate.judge.mode=pointwise -S evaluate.judge.model=/path/to/judge
                                                                        # each answer graded alone (local backend)
    In code:
        judge = open_judge(cfg, folder_of)                              # LocalJudge or EndpointJudge
        rows = judge_pairs(judge, pairs)                                # one row per pair, both orders judged
        figures = summarise(rows)                                       # win rate + CI, consistency, biases, agreement

Verdicts
    Each pair (x, y) is shown twice, x as answer A then y as answer A. A verdict that names the same answer in both
    orders is decisive; one that flips with the order (or names a tie, or none, in either) is a tie, and a flip or a
    half-tie counts against position consistency. Ties are allowed: the endpoint judge may answer `tie`, the local
    judge calls a tie when its two letters' log-probabilities are within `tie_margin` nats.

Modes (`mode`, local backend)
    pairwise   JUDGE_PROMPT with both answers; the verdict from log p(A) - log p(B). Two ~150-token answers and the
               instruction do not fit a 256-token context, so a small judge often sees both cut (`truncated`).
    pointwise  "single-answer grading" (MT-Bench's name): POINTWISE_PROMPT with one answer, its score
               log p(Y) - log p(N) (does it follow every requirement?); a pair's verdict is the answer with the higher
               score, a tie within `tie_margin` nats. Each answer is scored once, alone, so both orders get the same
               verdict: position consistency is 1 and position bias absent *by construction*, not by the judge's
               skill. Only half the context is needed, so answers are rarely cut.

Figures (`summarise`; the numbers are checked on hand-computed inputs in tests/test_judge.py)
    win_rate            (x wins + ties / 2) / pairs, with a 95 % Wilson score interval on n = pairs
                        (`win_rate_ci95_low`, `_high`). Each pair scores 0, 1/2 or 1; such a score has at most the
                        variance of a 0/1 score of the same mean (s^2 <= s on [0, 1]), so Wilson's interval for a
                        proportion is conservative here (wider than the ties need).
    decisive_win_rate   x wins / decisive verdicts, with its exact-proportion Wilson interval.
    tie_rate            ties / pairs.
    unparsed            single-order verdicts the judge did not give (an endpoint reply naming no answer or a request
                        it refused with HTTP 400, a local judge whose context cannot hold the prompt with
                        MIN_ANSWER_TOKENS of each answer): each a tie in its order.
    position_consistency pairs whose two single-order verdicts agree (the same answer, or tie both times) / pairs.
    position_bias       share of the decisive single-order verdicts that pick the answer shown first (0.5: none).
    length_bias         among decisive verdicts between answers of different length (words), the share picking the
                        longer; `checker_length_share` is the same share for the checker's strict preferences, the
                        baseline a length-blind judge that agrees with the checker would match.
    checker_agreement   on pairs the checker strictly decides (different constraint scores), the share where the
                        judge picks the answer the checker prefers (a judge tie is no agreement);
                        `checker_agreement_decisive` the same among the judge's decisive verdicts; `checker_kappa`
                        Cohen's kappa between the two labellings (x / tie / y) on those pairs: 0 = chance, 1 = the
                        checker itself.

Backends
    local      an HF Llama folder (or models:/ URI) run in-process. The verdict is read from the next-token
               log-probabilities of the letters `A` and `B` right after the judging prompt, not from free generation:
               a small model's free text rarely is a parseable verdict (it continues a story), sampling adds noise,
               and decoding costs a pass per token; one forward pass gives a verdict for every pair, deterministic,
               with its margin (how sure the judge is).
    endpoint   any OpenAI-compatible /v1/chat/completions (vLLM, a hosted model, `scratchlm serve`) through the
               `openai` client; the reply is parsed for `A`, `B` or `tie` at its start (`[[A]]`, `Answer: B.` too);
               a reply that names none is counted as `unparsed` and judged a tie in that order. The API key is read
               from the environment variable `api_key_env` names, never from params.yaml.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tasks.common.config import ScratchError, check

JUDGE_PROMPT = (
    "Which answer follows the instruction better? Check every requirement of the instruction.\n\n"
    "Instruction: {instruction}\n\n"
    "Answer A:\n{a}\n\n"
    "Answer B:\n{b}\n\n"
    "Reply with one letter, A or B (or tie if they are equally good)."
)
"""The judging prompt (one user turn), the same for both backends."""
LETTERS = ("A", "B")
POINTWISE_PROMPT = (
    "Instruction: {instruction}\n\n"
    "Answer:\n{answer}\n\n"
    "Does the answer follow every requirement of the instruction? Reply Y or N."
)
"""The pointwise judging prompt (one user turn, one answer): the score is log p(Y) - log p(N) right after it."""
GRADES = ("Y", "N")
SOURCE_PREFIX = "judge:"
"""`source` of every row of a judge preference file: judge feedback, not human feedback."""


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class EndpointConfig:
    base_url: str = ""
    """OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1 (`scratchlm serve`, vLLM) or a hosted API."""
    model: str = ""
    """Model name the endpoint serves (`GET /v1/models` lists them)."""
    api_key_env: str = ""
    """Name of the environment variable holding the API key ("" = no key: a loopback server). Never the key."""
    timeout_s: float = 60.0
    """Seconds one request may take before it fails."""
    concurrency: int = 8
    """Requests in flight at once (a batching server such as vLLM or `scratchlm serve` decodes them together)."""

    def __post_init__(self) -> None:
        check(self.timeout_s > 0, "timeout_s", "must be > 0")
        check(self.concurrency >= 1, "concurrency", "must be >= 1")


@dataclass(frozen=True)
class JudgeConfig:
    enabled: bool = True
    """Judge the pairs below (on the held-out answers the stage sampled)."""
    backend: Literal["local", "endpoint"] = "local"
    """`local`: the model named by `model`, run here; `endpoint`: the OpenAI-compatible API of `endpoint`."""
    mode: Literal["pairwise", "pointwise"] = "pairwise"
    """`pairwise`: the judge sees both answers and names the better (A or B); `pointwise` (local backend): it grades
    each answer alone, log p(Y) - log p(N), and the higher grade wins (position consistency 1 by construction)."""
    model: str = "self"
    """Local judge: `self` (each pair's first model judges its own pair: the candidate judging itself), a label of
    evaluate.models, an HF model folder (relative to the repository) or a models:/ or runs:/ URI."""
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    """The API the `endpoint` backend calls."""
    pairs: list[str] = field(default_factory=list)
    """Pairs `x:y` of evaluate.models labels: the judge's win rate of x over y ([] = the pairs of
    evaluate.win_rates, so each judge win rate sits beside the reward model's)."""
    prompts: int = 0
    """Held-out prompts judged per pair: the first n of those evaluate answered (0 = all of them)."""
    max_answer_chars: int = 0
    """Each answer is cut to this many characters before judging (0 = whole: what the checker scores); a local
    judge also cuts answers to fit its context (counted as `truncated`)."""
    tie_margin: float = 0.0
    """Local judge: a tie when |log p(A) - log p(B)| (pointwise: the two answers' grades) is at most this (nats;
    0 = ties only from order flips or equal grades)."""
    max_tokens: int = 8
    """Endpoint judge: longest reply (the verdict is its first word)."""
    temperature: float = 0.0
    """Endpoint judge: sampling temperature (0 = greedy: the same verdict on every run)."""
    seed: int = 0
    """Endpoint judge: request seed."""
    batch_size: int = 16
    """Local judge: judging prompts per forward pass."""
    write_preferences: bool = False
    """Write feedback/judge_preferences.jsonl: {prompt, chosen, rejected, source: "judge:<name>"} for every decisive,
    order-consistent verdict (judge feedback, not human: list it in reward/dpo `sources` knowingly)."""

    def __post_init__(self) -> None:
        check(self.prompts >= 0, "prompts", "must be >= 0 (0 = every held-out prompt)")
        check(self.max_answer_chars >= 0, "max_answer_chars", "must be >= 0 (0 = whole answers)")
        check(self.tie_margin >= 0, "tie_margin", "must be >= 0")
        check(self.max_tokens >= 1, "max_tokens", "must be >= 1")
        check(self.temperature >= 0, "temperature", "must be >= 0")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(bool(self.model), "model", "name the local judge: self, a label, a folder or a models:/ URI")
        if self.enabled and self.backend == "endpoint":
            check(self.mode == "pairwise", "mode", "pointwise grading needs the local backend (log-probabilities)")
            check(bool(self.endpoint.base_url), "endpoint.base_url", "the endpoint backend needs the API's URL")
            check(bool(self.endpoint.model), "endpoint.model", "the endpoint backend needs the served model's name")
        for pair in self.pairs:
            x, sep, y = pair.partition(":")
            check(bool(sep) and x and y and x != y, "pairs", f"{pair!r} must be `x:y` with two different labels")


# ------------------------------------------------------------------------------------------------ verdicts


@dataclass(frozen=True)
class Pair:
    """Two answers to one instruction: x's and y's, with the checker's score of each when it has one."""

    instruction: str
    x: str
    y: str
    checker_x: float | None = None
    checker_y: float | None = None


@dataclass(frozen=True)
class Choice:
    """One single-order verdict: `A`, `B` or `tie`, and what it came from (a margin in nats, or the reply)."""

    pick: Literal["A", "B", "tie"]
    margin: float | None = None  # local: log p(A) - log p(B); pointwise: grade(A) - grade(B)
    reply: str | None = None  # endpoint: the reply text
    parsed: bool = True
    truncated: bool = False


class Judge:
    """A judge: `name`, and `choose(items)` giving one Choice per (instruction, answer A, answer B)."""

    name: str = "judge"

    def choose(self, items: list[tuple[str, str, str]]) -> list[Choice]:
        raise NotImplementedError


def judging_prompt(instruction: str, a: str, b: str) -> str:
    return JUDGE_PROMPT.format(instruction=instruction.strip(), a=a.strip() or "(empty)", b=b.strip() or "(empty)")


def cut(text: str, max_chars: int) -> str:
    return text if not max_chars or len(text) <= max_chars else text[:max_chars]


def judge_pairs(judge: Judge, pairs: Sequence[Pair], max_answer_chars: int = 0) -> list[dict]:
    """Every pair judged in both orders (x first, then y first): one row per pair with both single-order verdicts
    (`orders`, in terms of x/y/tie), the combined `verdict`, `consistent`, the answers' word counts and checker
    scores. The 2n items go to the judge in one call (the local judge batches them, the endpoint one overlaps)."""
    items = []
    for p in pairs:
        x, y = cut(p.x, max_answer_chars), cut(p.y, max_answer_chars)
        items += [(p.instruction, x, y), (p.instruction, y, x)]
    choices = judge.choose(items)
    rows = []
    for i, p in enumerate(pairs):
        first, second = choices[2 * i], choices[2 * i + 1]
        # order 1 shows x as A; order 2 shows y as A
        orders = [{"A": "x", "B": "y", "tie": "tie"}[first.pick], {"A": "y", "B": "x", "tie": "tie"}[second.pick]]
        consistent = orders[0] == orders[1]
        rows.append(
            {
                "instruction": p.instruction,
                "x": p.x,
                "y": p.y,
                "orders": orders,
                "picks": [first.pick, second.pick],  # the position each order picked
                "verdict": orders[0] if consistent else "tie",
                "consistent": consistent,
                "margins": [first.margin, second.margin],
                "replies": [first.reply, second.reply],
                "unparsed": sum(not c.parsed for c in (first, second)),
                "truncated": first.truncated or second.truncated,
                "words_x": len(p.x.split()),
                "words_y": len(p.y.split()),
                "checker_x": p.checker_x,
                "checker_y": p.checker_y,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------ statistics

Z95 = 1.959964


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion successes / n ((0, 1) for n = 0)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's kappa of two labellings of the same items: (observed - chance agreement) / (1 - chance); None for
    no items, 1.0 when both use one and the same label throughout (no chance left to beat)."""
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    chance = sum(ca[k] * cb[k] for k in ca) / (n * n)
    return 1.0 if chance == 1.0 else (observed - chance) / (1 - chance)


def checker_preference(row: dict) -> str | None:
    """`x`, `y` or `tie` by the checker's scores; None without scores."""
    cx, cy = row.get("checker_x"), row.get("checker_y")
    if cx is None or cy is None:
        return None
    return "x" if cx > cy else "y" if cy > cx else "tie"


def longer(row: dict) -> str | None:
    """`x` or `y`, whichever answer has more words; None for equal lengths."""
    wx, wy = row["words_x"], row["words_y"]
    return "x" if wx > wy else "y" if wy > wx else None


def share(hits: int, n: int) -> float | None:
    return hits / n if n else None


def win_figures(rows: list[dict]) -> dict[str, Any]:
    n = len(rows)
    count = Counter(r["verdict"] for r in rows)
    decisive = count["x"] + count["y"]
    score = count["x"] + count["tie"] / 2
    return {
        "pairs": n,
        "x_wins": count["x"],
        "y_wins": count["y"],
        "ties": count["tie"],
        "win_rate": share(score, n),
        **interval("win_rate", score, n),
        "tie_rate": share(count["tie"], n),
        "decisive_win_rate": share(count["x"], decisive),
        **interval("decisive_win_rate", count["x"], decisive),
    }


def interval(name: str, successes: float, n: int) -> dict[str, float]:
    """`<name>_ci95_low` and `_high`: the Wilson interval as two numbers (MLflow and `dvc metrics diff` take no
    lists)."""
    low, high = wilson(successes, n)
    return {f"{name}_ci95_low": low, f"{name}_ci95_high": high}


def position_figures(rows: list[dict]) -> dict[str, Any]:
    picks = [p for r in rows for p in r["picks"] if p != "tie"]
    return {
        "position_consistency": share(sum(r["consistent"] for r in rows), len(rows)),
        "position_bias": share(sum(p == "A" for p in picks), len(picks)),
        "unparsed": sum(r.get("unparsed", 0) for r in rows),
        "truncated": sum(bool(r.get("truncated")) for r in rows),
    }


def length_figures(rows: list[dict]) -> dict[str, Any]:
    judged = [r for r in rows if r["verdict"] != "tie" and longer(r)]
    checked = [r for r in rows if checker_preference(r) in ("x", "y") and longer(r)]
    return {
        "length_bias": share(sum(r["verdict"] == longer(r) for r in judged), len(judged)),
        "length_bias_n": len(judged),
        "checker_length_share": share(sum(checker_preference(r) == longer(r) for r in checked), len(checked)),
        "checker_length_n": len(checked),
    }


def agreement_figures(rows: list[dict]) -> dict[str, Any]:
    strict = [r for r in rows if checker_preference(r) in ("x", "y")]
    decisive = [r for r in strict if r["verdict"] != "tie"]
    agreed = sum(r["verdict"] == checker_preference(r) for r in strict)
    return {
        "checker_pairs": len(strict),
        "checker_agreement": share(agreed, len(strict)),
        **interval("checker_agreement", agreed, len(strict)),
        "checker_agreement_decisive": share(
            sum(r["verdict"] == checker_preference(r) for r in decisive), len(decisive)
        ),
        "checker_kappa": cohen_kappa([r["verdict"] for r in strict], [checker_preference(r) for r in strict]),
        "checker_win_rate": share(
            sum({"x": 1.0, "tie": 0.5, "y": 0.0}[checker_preference(r)] for r in rows if checker_preference(r)),
            sum(checker_preference(r) is not None for r in rows),
        ),
    }


def summarise(rows: list[dict]) -> dict[str, Any]:
    """Every figure of the module docstring for one pair of models (None where a figure has no items)."""
    return {**win_figures(rows), **position_figures(rows), **length_figures(rows), **agreement_figures(rows)}


def preference_rows(rows: list[dict], name: str) -> list[dict]:
    """{prompt, chosen, rejected, source} for every decisive, order-consistent verdict (the reward/dpo contract)."""
    out = []
    for r in rows:
        if r["verdict"] == "tie" or not r["x"].strip() or not r["y"].strip() or r["x"] == r["y"]:
            continue  # a tie, or a pair the stages would quarantine (empty or identical replies)
        chosen, rejected = (r["x"], r["y"]) if r["verdict"] == "x" else (r["y"], r["x"])
        out.append({"prompt": r["instruction"], "chosen": chosen, "rejected": rejected, "source": SOURCE_PREFIX + name})
    return out


# ------------------------------------------------------------------------------------------------ local judge


MIN_ANSWER_TOKENS = 8
"""A local judge gives no verdict (NO_ROOM) rather than judge answers cut shorter than this to fit its context."""
NO_ROOM = Choice("tie", parsed=False, truncated=True)


class LocalJudge(Judge):
    """A model folder judging in-process by the log-probabilities of `A` and `B` after the judging prompt."""

    def __init__(self, folder: Path, name: str, device: str = "cpu", batch_size: int = 16, tie_margin: float = 0.0):
        from tasks.common.alignment import load_model_folder, load_tokenizer

        self.name, self.device, self.batch_size, self.tie_margin = name, device, batch_size, tie_margin
        self.model = load_model_folder(folder, f"judge {name}").to(device).eval()
        self.tok = load_tokenizer(folder)
        self.letters = [self._letter_id(letter, folder) for letter in LETTERS]

    def _letter_id(self, letter: str, folder: Path) -> int:
        ids = self.tok.plain(letter)
        if len(ids) != 1:
            raise ScratchError(f"{folder}: the judge's tokenizer spells {letter!r} as {len(ids)} tokens, not one")
        return ids[0]

    def encode(self, instruction: str, a: str, b: str) -> tuple[list[int] | None, bool]:
        """The judging prompt's ids ending in the generation prompt, the answers cut to fit the context (None when
        not even the instruction with a few tokens of each answer fits), and whether an answer was cut."""
        from tasks.common import chat

        def ids_of(a_text: str, b_text: str) -> list[int]:
            message = [{"role": "user", "content": judging_prompt(instruction, a_text, b_text)}]
            return chat.encode_chat(self.tok.tok, message, add_generation_prompt=True)[0]

        ids, limit = ids_of(a, b), self.model.cfg.max_seq_len
        if len(ids) <= limit:
            return ids, False
        budget = (limit - len(ids_of("", "")) - 4) // 2  # tokens per answer; - 4: merges at the cut, "(empty)"
        while budget >= MIN_ANSWER_TOKENS:
            ids = ids_of(*(self.tok.decode(self.tok.plain(t)[:budget]) for t in (a, b)))
            if len(ids) <= limit:
                return ids, True
            budget -= 4
        return None, True

    def choose(self, items: list[tuple[str, str, str]]) -> list[Choice]:
        encoded = [self.encode(*item) for item in items]
        found = iter(self.margins([ids for ids, _ in encoded if ids is not None], self.letters))
        return [self._choice(next(found), cut_) if ids is not None else NO_ROOM for ids, cut_ in encoded]

    def margins(self, prompts: list[list[int]], tokens: list[int]) -> list[float]:
        """log p(tokens[0]) - log p(tokens[1]) as the next token after each prompt, batch_size prompts a pass."""
        import torch

        out: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(prompts), self.batch_size):
                chunk = prompts[start : start + self.batch_size]
                width = max(len(ids) for ids in chunk)
                x = torch.full((len(chunk), width), self.tok.pad_id, dtype=torch.long)  # (B,W) right-padded
                for b, ids in enumerate(chunk):
                    x[b, : len(ids)] = torch.tensor(ids)
                h = self.model.hidden_states(x.to(self.device))  # (B,W,D); padding after a row cannot reach it
                last = torch.tensor([len(ids) - 1 for ids in chunk], device=h.device)
                logits = self.model.lm_head(h[torch.arange(len(chunk), device=h.device), last])  # (B,V): only there
                logp = torch.log_softmax(logits.float(), dim=-1)  # (B,V)
                out += (logp[:, tokens[0]] - logp[:, tokens[1]]).tolist()  # (B,)
        return out

    def _choice(self, margin: float, truncated: bool) -> Choice:
        pick = "tie" if abs(margin) <= self.tie_margin else "A" if margin > 0 else "B"
        return Choice(pick, margin=margin, truncated=truncated)


class PointwiseJudge(LocalJudge):
    """A local judge grading each answer alone: log p(Y) - log p(N) after POINTWISE_PROMPT. A pair's verdict is
    the answer with the higher grade (a tie within tie_margin); each distinct answer is graded once."""

    def __init__(self, folder: Path, name: str, device: str = "cpu", batch_size: int = 16, tie_margin: float = 0.0):
        super().__init__(folder, name, device, batch_size, tie_margin)
        self.grades = [self._letter_id(grade, folder) for grade in GRADES]

    def encode_answer(self, instruction: str, answer: str) -> tuple[list[int] | None, bool]:
        """The pointwise prompt's ids ending in the generation prompt, the answer's end cut to fit the context (None
        when the instruction leaves room for fewer than MIN_ANSWER_TOKENS of it), and whether it was cut."""
        from tasks.common import chat

        def ids_of(text: str) -> list[int]:
            content = POINTWISE_PROMPT.format(instruction=instruction.strip(), answer=text.strip() or "(empty)")
            return chat.encode_chat(self.tok.tok, [{"role": "user", "content": content}], add_generation_prompt=True)[0]

        ids, limit = ids_of(answer), self.model.cfg.max_seq_len
        if len(ids) <= limit:
            return ids, False
        budget = limit - len(ids_of("")) - 4  # - 4: merges at the cut
        while budget >= MIN_ANSWER_TOKENS:
            ids = ids_of(self.tok.decode(self.tok.plain(answer.strip())[:budget]))
            if len(ids) <= limit:
                return ids, True
            budget -= 4
        return None, True

    def grade(self, answers: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[float | None, bool]]:
        """(grade or None when it does not fit, cut) of each distinct (instruction, answer)."""
        encoded = {key: self.encode_answer(*key) for key in dict.fromkeys(answers)}
        fitting = [key for key, (ids, _) in encoded.items() if ids is not None]
        grades = dict(zip(fitting, self.margins([encoded[k][0] for k in fitting], self.grades), strict=True))
        return {key: (grades.get(key), cut_) for key, (_, cut_) in encoded.items()}

    def choose(self, items: list[tuple[str, str, str]]) -> list[Choice]:
        graded = self.grade([(ins, answer) for ins, a, b in items for answer in (a, b)])
        return pointwise_choices(items, graded, self.tie_margin)


def pointwise_choices(
    items: list[tuple[str, str, str]], graded: dict[tuple[str, str], tuple[float | None, bool]], tie_margin: float
) -> list[Choice]:
    """One Choice per (instruction, A, B) from the answers' grades: the higher grade wins, margin grade(A) - grade(B),
    a tie within tie_margin; NO_ROOM when either answer could not be graded. Swapping A and B flips the pick, so
    both orders of a pair always agree."""
    out = []
    for ins, a, b in items:
        (ga, cut_a), (gb, cut_b) = graded[ins, a], graded[ins, b]
        if ga is None or gb is None:
            out.append(NO_ROOM)
            continue
        margin = ga - gb
        pick = "tie" if abs(margin) <= tie_margin else "A" if margin > 0 else "B"
        out.append(Choice(pick, margin=margin, truncated=cut_a or cut_b))
    return out


def local_judge(folder: Path, name: str, mode: str = "pairwise", device: str = "cpu", **kwargs: Any) -> LocalJudge:
    """The local judge of `mode` (pairwise: LocalJudge, pointwise: PointwiseJudge) on the model in `folder`."""
    if mode not in ("pairwise", "pointwise"):
        raise ScratchError(f"judge mode must be pairwise or pointwise, got {mode!r}")
    return (PointwiseJudge if mode == "pointwise" else LocalJudge)(folder, name, device, **kwargs)


# ------------------------------------------------------------------------------------------------ endpoint judge

VERDICT = re.compile(r"\s*(?:\[\[)?\s*(?:(?:[Aa]nswer|[Vv]erdict)\s*:?\s*)?(A|B|[Tt]ie|TIE)(?=\s*(?:$|[.,:;!)\]\n]))")
"""A reply's verdict at its start: `A`, `B.`, `[[A]]`, `Answer: B`, `tie`; not the `A` of `A cat sat.`"""


def parse_verdict(reply: str) -> Literal["A", "B", "tie"] | None:
    found = VERDICT.match(reply or "")
    if not found:
        return None
    word = found.group(1)
    return word if word in LETTERS else "tie"  # type: ignore[return-value]


class EndpointJudge(Judge):
    """A model behind an OpenAI-compatible API, asked for its verdict in words (no logprobs needed)."""

    def __init__(self, cfg: EndpointConfig, max_tokens: int = 8, temperature: float = 0.0, seed: int = 0):
        import openai

        self.cfg, self.max_tokens, self.temperature, self.seed = cfg, max_tokens, temperature, seed
        self.name = f"{cfg.model}@{cfg.base_url}"
        self.client = openai.OpenAI(base_url=cfg.base_url, api_key=api_key(cfg), timeout=cfg.timeout_s, max_retries=1)
        self._check_model()

    def _check_model(self) -> None:
        """Fail before judging when the endpoint does not answer or does not serve the model."""
        import openai

        try:
            served = [m.id for m in self.client.models.list()]
        except openai.APIConnectionError as e:
            raise ScratchError(
                f"evaluate.judge.endpoint.base_url: cannot reach {self.cfg.base_url} ({type(e).__name__}: {e})"
            ) from None
        except openai.AuthenticationError as e:
            raise ScratchError(
                f"evaluate.judge.endpoint: {self.cfg.base_url} refused the API key from "
                f"${self.cfg.api_key_env or '(none: api_key_env is empty)'} ({e.status_code})"
            ) from None
        except openai.APIStatusError:
            return  # an API without GET /models: the first request says whether the model exists
        if served and self.cfg.model not in served:
            raise ScratchError(
                f"evaluate.judge.endpoint.model: {self.cfg.model!r} is not served at {self.cfg.base_url} "
                f"(served: {', '.join(served)})"
            )

    def ask(self, item: tuple[str, str, str]) -> Choice:
        import openai

        try:
            reply = self.client.chat.completions.create(
                model=self.cfg.model,
                messages=[{"role": "user", "content": judging_prompt(*item)}],
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                seed=self.seed,
            )
        except openai.BadRequestError as e:  # this prompt only (e.g. longer than the model's context): no verdict
            return Choice("tie", reply=f"(refused: {e.message})", parsed=False)
        except openai.APIError as e:
            raise ScratchError(f"evaluate.judge.endpoint: {self.cfg.base_url} failed a request: {e}") from None
        text = reply.choices[0].message.content or ""
        pick = parse_verdict(text)
        return Choice(pick or "tie", reply=text, parsed=pick is not None)

    def choose(self, items: list[tuple[str, str, str]]) -> list[Choice]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            return list(pool.map(self.ask, items))


def api_key(cfg: EndpointConfig) -> str:
    """The key from the environment variable cfg.api_key_env names; a placeholder without one (the client needs a
    string, a loopback server ignores it)."""
    if not cfg.api_key_env:
        return "no-key"
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise ScratchError(
            f"evaluate.judge.endpoint.api_key_env: the environment variable {cfg.api_key_env} is not set "
            f"(export it with the key of {cfg.base_url}, or set api_key_env: '' for a server without a key)"
        )
    return key


# ------------------------------------------------------------------------------------------------ opening a judge


def local_folder(spec: str, labels: dict[str, Path], workdir: Path, root: Path) -> Path:
    """The folder of a local judge spec other than `self`: a model label, a models:/ or runs:/ URI, or a folder."""
    if spec in labels:
        return labels[spec]
    if spec.startswith(("models:/", "runs:/")):
        from tasks.common.registry import download_model

        return download_model(spec, workdir, key="evaluate.judge.model")
    folder = Path(spec) if Path(spec).is_absolute() else root / spec
    if not (folder / "config.json").is_file():
        raise ScratchError(
            f"evaluate.judge.model: {spec!r} is neither `self`, a label of evaluate.models ({', '.join(labels)}), "
            f"a models:/ URI nor a model folder ({folder} has no config.json)"
        )
    return folder


def open_judges(
    cfg: JudgeConfig, labels: dict[str, Path], workdir: Path, root: Path, device: str
) -> Callable[[str], Judge]:
    """judge_for(x): the judge of a pair whose first model is x. One judge for every pair, except `self` (x's)."""
    if cfg.backend == "endpoint":
        judge: Judge = EndpointJudge(cfg.endpoint, cfg.max_tokens, cfg.temperature, cfg.seed)
        return lambda x: judge
    opened: dict[str, Judge] = {}

    def judge_for(x: str) -> Judge:
        spec = x if cfg.model == "self" else cfg.model
        if spec not in opened:
            folder = local_folder(spec, labels, workdir, root)
            name = f"self:{x}" if cfg.model == "self" else spec
            opened.clear()  # one local model in memory at a time
            opened[spec] = local_judge(
                folder, name, cfg.mode, device, batch_size=cfg.batch_size, tie_margin=cfg.tie_margin
            )
        return opened[spec]

    return judge_for
