"""The LLM judge (tasks/common/judge.py): its statistics on hand-computed inputs, the local backend's letter
log-probabilities against transformers' own forward pass, the endpoint backend on a real `scratchlm serve` through
the openai client, the evaluate stage's judge step writing verdicts and a judge preference file that the reward/dpo
loader takes whole, and clear errors for a bad config, an unreachable endpoint, an unserved model, a missing key."""

from __future__ import annotations

import json
import math
from pathlib import Path

import openai
import pytest
import torch

from tasks.common.config import ConfigError, ScratchError, build
from tasks.common.judge import (
    POINTWISE_PROMPT,
    Choice,
    EndpointConfig,
    EndpointJudge,
    Judge,
    JudgeConfig,
    LocalJudge,
    Pair,
    PointwiseJudge,
    cohen_kappa,
    judge_pairs,
    judging_prompt,
    local_judge,
    parse_verdict,
    pointwise_choices,
    preference_rows,
    summarise,
    wilson,
)
from tests.serve_fixtures import serve_world, serving


class Scripted(Judge):
    """A judge whose single-order verdicts are given in advance (to hand-compute the statistics)."""

    name = "scripted"

    def __init__(self, picks: list[str]) -> None:
        self.picks, self.seen = picks, []

    def choose(self, items):
        self.seen += items
        return [Choice(p) for p in self.picks]


# (x, y, checker_x, checker_y) and the two single-order picks: x shown first, then y shown first
CASES = [
    (("a b c", "a", 1.0, 0.0), ("A", "B")),  # x both times: x wins; x longer, checker prefers x
    (("a", "a b", 1.0, 0.5), ("A", "A")),  # first position both times: a flip, a tie; checker prefers the shorter x
    (("a b", "a b c d", 0.0, 1.0), ("B", "A")),  # y both times: y wins; y longer, checker prefers y
    (("a b", "c d", 1.0, 1.0), ("tie", "tie")),  # a tie both times: consistent; the checker has no preference
]


@pytest.fixture(scope="module")
def scripted_rows() -> list[dict]:
    pairs = [Pair(f"instruction {i}", *answers) for i, (answers, _) in enumerate(CASES)]
    return judge_pairs(Scripted([p for _, picks in CASES for p in picks]), pairs)


def test_both_orders_are_asked_and_combined(scripted_rows):
    judge = Scripted(["A", "A"])
    judge_pairs(judge, [Pair("do it", "first answer", "second answer")])
    assert judge.seen == [("do it", "first answer", "second answer"), ("do it", "second answer", "first answer")]
    assert [r["orders"] for r in scripted_rows] == [["x", "x"], ["x", "y"], ["y", "y"], ["tie", "tie"]]
    assert [r["verdict"] for r in scripted_rows] == ["x", "tie", "y", "tie"]
    assert [r["consistent"] for r in scripted_rows] == [True, False, True, True]


def test_statistics_equal_hand_computed_values(scripted_rows):
    f = summarise(scripted_rows)
    assert (f["x_wins"], f["y_wins"], f["ties"]) == (1, 1, 2)
    assert f["win_rate"] == 0.5  # (1 + 2 / 2) / 4
    assert (f["win_rate_ci95_low"], f["win_rate_ci95_high"]) == pytest.approx((0.1500, 0.8500), abs=1e-4)  # 2/4
    assert f["tie_rate"] == 0.5 and f["decisive_win_rate"] == 0.5
    assert f["position_consistency"] == 0.75
    assert f["position_bias"] == pytest.approx(4 / 6)  # A picked 4 times of the 6 decisive single-order verdicts
    assert (f["length_bias"], f["length_bias_n"]) == (1.0, 2)  # both decisive verdicts picked the longer answer
    assert (f["checker_length_share"], f["checker_length_n"]) == (pytest.approx(2 / 3), 3)
    assert f["checker_pairs"] == 3
    assert f["checker_agreement"] == pytest.approx(2 / 3)  # the tie on case 2 is no agreement
    assert f["checker_agreement_decisive"] == 1.0
    assert f["checker_kappa"] == pytest.approx(0.5)  # observed 2/3, chance (1*2 + 1*1) / 9 = 1/3
    assert f["checker_win_rate"] == 0.625  # x, x, y, tie


def test_wilson_and_kappa_reference_values():
    assert wilson(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)  # the textbook 0/10 interval
    assert wilson(8, 10) == pytest.approx((0.49016, 0.94331), abs=1e-5)
    assert wilson(0, 0) == (0.0, 1.0)
    assert cohen_kappa(["x", "y", "x", "y"], ["x", "y", "x", "y"]) == 1.0
    assert cohen_kappa(["x", "x", "y", "y"], ["x", "y", "x", "y"]) == 0.0
    assert cohen_kappa([], []) is None


def test_preferences_keep_decisive_consistent_verdicts_labelled_as_judge(scripted_rows, tmp_path):
    from tasks.common.dvcio import write_jsonl
    from tasks.common.train_config import AlignmentData
    from tasks.sources.examples import load_preference_data

    rows = preference_rows(scripted_rows, "self:dpo")
    assert rows == [
        {"prompt": "instruction 0", "chosen": "a b c", "rejected": "a", "source": "judge:self:dpo"},
        {"prompt": "instruction 2", "chosen": "a b c d", "rejected": "a b", "source": "judge:self:dpo"},
    ]
    file = write_jsonl(tmp_path / "feedback" / "judge_preferences.jsonl", rows)
    loaded = load_preference_data(AlignmentData(sources=[str(file)], builtin_train=0, builtin_val=0), tmp_path)
    assert loaded.counts()["quarantined"] == 0 and len(loaded.train) + len(loaded.val) == 2


def test_report_card_shows_the_judge_beside_the_reward_model(scripted_rows):
    from tasks.common.report import judge_section

    ev = {
        "win_rate": {"dpo_vs_sft": 0.625},
        "judge": {"judges": {"dpo_vs_sft": "self:dpo"}, "pairs": {"dpo_vs_sft": summarise(scripted_rows)}},
    }
    text = "\n".join(judge_section(ev))
    assert "| dpo vs sft | self:dpo | 4 | 0.5000 [0.15, 0.85] | 0.6250 | 0.5000 | 0.7500 | 0.6667 |" in text
    assert "| 1.0000 (0.6667) | 0.6667 of 3 | 0.5000 |" in text
    assert "## Judge (LLM-as-judge, pairwise, calibrated" in text and "judged twice, the answers swapped" in text
    ev["judge"]["mode"] = "pointwise"  # the record's mode names the method in the heading and the note
    text = "\n".join(judge_section(ev))
    assert "## Judge (LLM-as-judge, pointwise, calibrated" in text and "graded alone" in text
    assert "judged twice" not in text
    assert judge_section({"judge": {}}) == []


def test_parse_verdict():
    for reply, pick in [("A", "A"), (" B.", "B"), ("[[A]]", "A"), ("Answer: B", "B"), ("tie", "tie"), ("Tie.", "tie")]:
        assert parse_verdict(reply) == pick, reply
    for reply in ["A cat sat on the mat.", "Both are fine", "", "Bob went home."]:
        assert parse_verdict(reply) is None, reply


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"evaluate.judge.modell: unknown key \(did you mean 'model'\?\)"):
        build(JudgeConfig, {"modell": "self"}, "evaluate.judge")
    with pytest.raises(ConfigError, match="endpoint.base_url: the endpoint backend needs"):
        JudgeConfig(backend="endpoint")
    with pytest.raises(ConfigError, match="pairs: 'dpo' must be `x:y`"):
        JudgeConfig(pairs=["dpo"])
    from tasks.evaluate import EvaluateConfig

    with pytest.raises(ConfigError, match=r"judge.pairs: 'dpo:nope': both must be labels"):
        EvaluateConfig(judge=JudgeConfig(pairs=["dpo:nope"]))


# ------------------------------------------------------------------------------------------------ real models


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return serve_world(tmp_path_factory)


PAIRS = [
    Pair("Write a story about a cat named Tom. Use at most 2 sentences.", "Tom sat. Tom slept.", "Tom ran " * 30),
    Pair("Tell me a story about Lily. Start with a title.", "Lily's Day\nLily went to the park.", "Lily went home."),
    Pair("Write a short story about a dog.", "The dog ran to the river and found a ball.", ""),
]


def test_local_judge_reads_the_letters_log_probabilities(world):
    from transformers import AutoTokenizer, LlamaForCausalLM

    judge = LocalJudge(world / "champion", "champion", tie_margin=0.0)
    rows = judge_pairs(judge, PAIRS)
    hf = LlamaForCausalLM.from_pretrained(world / "champion").eval()
    tok = AutoTokenizer.from_pretrained(world / "champion")
    a, b = tok.convert_tokens_to_ids(["A", "B"])
    for pair, row in zip(PAIRS, rows):
        for order, (first, second) in enumerate([(pair.x, pair.y), (pair.y, pair.x)]):
            messages = [{"role": "user", "content": judging_prompt(pair.instruction, first, second)}]
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
            with torch.inference_mode():
                logp = torch.log_softmax(hf(ids["input_ids"]).logits[0, -1].float(), dim=-1)
            margin = (logp[a] - logp[b]).item()
            assert row["margins"][order] == pytest.approx(margin, abs=1e-4)
            assert row["picks"][order] == ("A" if margin > 0 else "B")
    tied = judge_pairs(LocalJudge(world / "champion", "champion", tie_margin=1e9), PAIRS[:1])[0]
    assert tied["picks"] == ["tie", "tie"] and tied["verdict"] == "tie" and tied["consistent"]


def test_local_judge_cuts_answers_to_its_context(world):
    judge = LocalJudge(world / "champion", "champion")
    long = "Tom went to the park and played with a red ball. " * 80  # ~1000 tokens; the context is 512
    ids, truncated = judge.encode("Write a long story.", long, long)
    assert truncated and len(ids) <= judge.model.cfg.max_seq_len
    assert judge_pairs(judge, [Pair("Write a long story.", long, "Tom sat.")])[0]["truncated"]
    huge = "Write a story about a cat. " * 120  # the instruction alone fills the context: no verdict, not an error
    assert judge.encode(huge, "Tom sat.", "Tom ran.")[0] is None
    row = judge_pairs(judge, [Pair(huge, "Tom sat.", "Tom ran.")])[0]
    assert row["unparsed"] == 2 and row["verdict"] == "tie" and row["margins"] == [None, None]


@pytest.fixture(scope="module")
def running(world, tmp_path_factory):
    with serving(world, tmp_path_factory.mktemp("judge-feedback")) as running:
        yield running


def test_endpoint_judge_on_scratchlm_serve(running, world):
    spec = str(world / "champion")
    cfg = EndpointConfig(base_url=f"{running.url}/v1", model=spec, concurrency=4)
    judge = EndpointJudge(cfg, max_tokens=6, temperature=0.0, seed=0)
    rows_before = running.server.engine(spec).stats["rows"]
    rows = judge_pairs(judge, PAIRS)
    assert running.server.engine(spec).stats["rows"] - rows_before == 2 * len(PAIRS)  # both orders, every pair
    client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
    for pair, row in zip(PAIRS, rows):
        for order, (first, second) in enumerate([(pair.x, pair.y), (pair.y, pair.x)]):
            reply = client.chat.completions.create(
                model=spec,
                messages=[{"role": "user", "content": judging_prompt(pair.instruction, first, second)}],
                max_tokens=6,
                temperature=0.0,
                seed=0,
            )
            text = reply.choices[0].message.content
            assert row["replies"][order] == text  # greedy: the same reply the judge got
            assert row["picks"][order] == (parse_verdict(text) or "tie")
        assert row["unparsed"] == sum(parse_verdict(t) is None for t in row["replies"])
    figures = summarise(rows)
    assert figures["pairs"] == 3 and 0.0 <= figures["win_rate"] <= 1.0
    huge = judge_pairs(judge, [Pair("Write a story.", "Tom ran to the park. " * 200, "Tom sat.")])[0]
    assert huge["unparsed"] == 2 and huge["verdict"] == "tie"  # longer than the served context: refused, no verdict
    assert all(r.startswith("(refused: ") and "context" in r for r in huge["replies"]), huge["replies"]


def test_endpoint_errors_name_the_url_the_model_and_the_key(running, monkeypatch):
    with pytest.raises(ScratchError, match=r"endpoint.base_url: cannot reach http://127.0.0.1:9/v1"):
        EndpointJudge(EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m", timeout_s=5))
    with pytest.raises(ScratchError, match=r"endpoint.model: 'gpt-nope' is not served at .*served: "):
        EndpointJudge(EndpointConfig(base_url=f"{running.url}/v1", model="gpt-nope"))
    monkeypatch.delenv("SCRATCHLM_JUDGE_TEST_KEY", raising=False)
    with pytest.raises(ScratchError, match="api_key_env: the environment variable SCRATCHLM_JUDGE_TEST_KEY is not set"):
        EndpointJudge(EndpointConfig(base_url=f"{running.url}/v1", model="m", api_key_env="SCRATCHLM_JUDGE_TEST_KEY"))


def test_evaluate_judge_step_writes_verdicts_figures_and_preferences(world, tmp_path):
    """The evaluate stage's judge step on two models' answers: `self` judges (each pair's first model), the
    checker's scores beside the verdicts, data/evaluate/judge/<pair>.jsonl and feedback/judge_preferences.jsonl."""
    from tasks.common.dvcio import stage_paths
    from tasks.common.tracking import Tracker
    from tasks.evaluate import EvaluateConfig, Evaluated, judge_answers
    from tasks.sources.examples import checker_score, held_out_prompts

    held = held_out_prompts(4, 4242)
    answers = {"good": [h["id"] + " Tom sat." for h in held], "bad": ["The end." for _ in held]}
    answer_rows = {
        label: [
            {"id": h["id"], "prompt": h["prompt_messages"][-1]["content"], "answer": a, "constraints": h["constraints"]}
            for h, a in zip(held, texts)
        ]
        for label, texts in answers.items()
    }
    models = [Evaluated("good", "sft", world / "champion"), Evaluated("bad", "dpo", world / "challenger")]
    cfg = EvaluateConfig(
        models={"good": "sft", "bad": "dpo"},
        win_rates=["good:bad"],
        judge=JudgeConfig(pairs=["good:bad", "bad:good"], write_preferences=True),
    )
    paths = stage_paths("evaluate", root=tmp_path)
    skipped: dict = {}
    result = judge_answers(cfg, models, answer_rows, paths, "cpu", paths.out, Tracker("evaluate", None), skipped)
    assert result["judges"] == {"good_vs_bad": "self:good", "bad_vs_good": "self:bad"} and not skipped
    assert (result["backend"], result["mode"]) == ("local", "pairwise")
    rows = [json.loads(line) for line in (paths.out / "judge" / "good_vs_bad.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert [r["checker_x"] for r in rows] == [checker_score(r, a) for r, a in zip(answer_rows["good"], answers["good"])]
    figures = result["pairs"]["good_vs_bad"]
    assert figures == summarise(rows)
    assert not math.isnan(figures["win_rate"])
    written = [
        json.loads(line) for line in (tmp_path / "feedback" / "judge_preferences.jsonl").read_text().splitlines()
    ]
    decisive = sum(r["verdict"] != "tie" for key in ("good_vs_bad", "bad_vs_good") for r in _rows(paths, key))
    assert len(written) == decisive == result["preferences"]["pairs"]
    assert {r["source"] for r in written} <= {"judge:self:good", "judge:self:bad"}


def test_evaluate_judge_step_through_an_endpoint(running, world, tmp_path):
    from tasks.common.dvcio import stage_paths
    from tasks.common.tracking import Tracker
    from tasks.evaluate import EvaluateConfig, Evaluated, judge_answers

    rows = [{"id": "p0", "prompt": "Write a story about Tom.", "answer": "Tom sat.", "constraints": {"name": "Tom"}}]
    other = [{**rows[0], "answer": "Mia sat."}]
    endpoint = EndpointConfig(base_url=f"{running.url}/v1", model=str(world / "champion"))
    cfg = EvaluateConfig(
        models={"a": "sft", "b": "dpo"}, win_rates=["a:b"], judge=JudgeConfig(backend="endpoint", endpoint=endpoint)
    )
    models = [Evaluated("a", "sft", world / "champion"), Evaluated("b", "dpo", world / "challenger")]
    paths = stage_paths("evaluate", root=tmp_path)
    result = judge_answers(cfg, models, {"a": rows, "b": other}, paths, "cpu", paths.out, Tracker("evaluate", None), {})
    assert result["backend"] == "endpoint" and result["judges"] == {"a_vs_b": f"{world / 'champion'}@{running.url}/v1"}
    assert result["pairs"]["a_vs_b"]["checker_pairs"] == 1  # "Tom sat." meets the name constraint, "Mia sat." not
    assert (paths.out / "judge" / "a_vs_b.jsonl").is_file()


def _rows(paths, key: str) -> list[dict]:
    return [json.loads(line) for line in (paths.out / "judge" / f"{key}.jsonl").read_text().splitlines()]


def test_a_registered_model_judges_by_its_models_uri(tmp_path_factory, tmp_path):
    """`evaluate.judge.model: models:/scratchlm@challenger`: downloaded from the registry as `scratchlm serve`
    does; the same verdicts as the registered folder itself."""
    from tasks.common.judge import local_folder
    from tests.evaluate_fixtures import registered

    with registered(tmp_path_factory, "judge_registry") as (root, record):
        folder = local_folder("models:/scratchlm@challenger", {}, tmp_path, root)
        assert (folder / "config.json").is_file()
        downloaded = judge_pairs(LocalJudge(folder, "challenger"), PAIRS[:2])
        local = judge_pairs(LocalJudge(root / "data" / "dpo" / "model", "dpo"), PAIRS[:2])
        assert [m for r in downloaded for m in r["margins"]] == pytest.approx([m for r in local for m in r["margins"]])
        with pytest.raises(ScratchError, match=r"evaluate.judge.model: models:/scratchlm@nope cannot be loaded"):
            local_folder("models:/scratchlm@nope", {}, tmp_path, root)
    with pytest.raises(ScratchError, match=r"evaluate.judge.model: 'no/such/folder' is neither `self`"):
        local_folder("no/such/folder", {"sft": tmp_path}, tmp_path, tmp_path)


# ------------------------------------------------------------------------------------------------ pointwise mode


class Graded(Judge):
    """A pointwise judge whose grades are given in advance (to hand-compute the pair verdicts)."""

    name = "graded"

    def __init__(self, grades: dict[str, float | None], tie_margin: float) -> None:
        self.grades, self.tie_margin = grades, tie_margin

    def choose(self, items):
        graded = {(ins, t): (self.grades[t], False) for ins, a, b in items for t in (a, b)}
        return pointwise_choices(items, graded, self.tie_margin)


def test_pointwise_verdicts_from_hand_given_grades():
    grades = {"good": 2.0, "bad": 0.5, "close": 0.4, "long": None}
    pairs = [Pair("i", "good", "bad", 1.0, 0.5), Pair("i", "bad", "close", 0.5, 1.0), Pair("i", "long", "good")]
    rows = judge_pairs(Graded(grades, tie_margin=0.2), pairs)
    assert [r["picks"] for r in rows] == [["A", "B"], ["tie", "tie"], ["tie", "tie"]]
    assert [r["verdict"] for r in rows] == ["x", "tie", "tie"]
    assert rows[0]["margins"] == [1.5, -1.5]  # grade(A) - grade(B) in each order
    assert rows[1]["margins"] == pytest.approx([0.1, -0.1])  # within tie_margin: a tie
    assert rows[2]["unparsed"] == 2  # an answer without a grade: no verdict in either order
    f = summarise(rows)
    assert f["position_consistency"] == 1.0  # by construction: one grade per answer, whatever the order
    assert f["position_bias"] == 0.5  # A once, B once among the decisive single-order verdicts
    assert (f["checker_pairs"], f["checker_agreement"]) == (2, 0.5)  # x agrees, the tie does not
    assert judge_pairs(Graded(grades, tie_margin=0.0), pairs[1:2])[0]["verdict"] == "x"  # 0.5 > 0.4: x, not y


def test_pointwise_judge_grades_each_answer_alone_like_transformers(world):
    from transformers import AutoTokenizer, LlamaForCausalLM

    judge = local_judge(world / "champion", "champion", "pointwise")
    assert isinstance(judge, PointwiseJudge)
    prompts: list[int] = []
    margins = judge.margins
    judge.margins = lambda ids, tokens: prompts.append(len(ids)) or margins(ids, tokens)
    rows = judge_pairs(judge, PAIRS)
    assert prompts == [6]  # 3 pairs x 2 orders x 2 answers, each distinct answer graded once, in one call
    hf = LlamaForCausalLM.from_pretrained(world / "champion").eval()
    tok = AutoTokenizer.from_pretrained(world / "champion")
    y, n = tok.convert_tokens_to_ids(["Y", "N"])

    def grade(instruction: str, answer: str) -> float:
        content = POINTWISE_PROMPT.format(instruction=instruction, answer=answer.strip() or "(empty)")
        messages = [{"role": "user", "content": content}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        with torch.inference_mode():
            logp = torch.log_softmax(hf(ids["input_ids"]).logits[0, -1].float(), dim=-1)
        return (logp[y] - logp[n]).item()

    for pair, row in zip(PAIRS, rows):
        difference = grade(pair.instruction, pair.x) - grade(pair.instruction, pair.y)
        assert row["margins"] == pytest.approx([difference, -difference], abs=1e-4)
        assert row["consistent"] and row["verdict"] == ("x" if difference > 0 else "y")


def test_pointwise_judge_cuts_the_answer_to_its_context(world):
    judge = local_judge(world / "champion", "champion", "pointwise")
    long = "Tom went to the park and played with a red ball. " * 80  # ~1000 tokens; the context is 512
    ids, truncated = judge.encode_answer("Write a long story.", long)
    assert truncated and judge.model.cfg.max_seq_len - 16 <= len(ids) <= judge.model.cfg.max_seq_len  # cut to fill it
    assert judge.encode_answer("Write a story.", "Tom sat.")[1] is False
    huge = "Write a story about a cat. " * 120  # the instruction alone fills the context: no grade, not an error
    assert judge.encode_answer(huge, "Tom sat.") == (None, True)
    assert judge_pairs(judge, [Pair(huge, "Tom sat.", "Tom ran.")])[0]["unparsed"] == 2


def test_pointwise_mode_config():
    assert JudgeConfig().mode == "pairwise"  # the default is unchanged
    assert build(JudgeConfig, {"mode": "pointwise"}, "evaluate.judge").mode == "pointwise"
    with pytest.raises(ConfigError, match="mode"):
        build(JudgeConfig, {"mode": "pointwize"}, "evaluate.judge")
    endpoint = EndpointConfig(base_url="http://127.0.0.1:8000/v1", model="m")
    with pytest.raises(ConfigError, match="mode: pointwise grading needs the local backend"):
        JudgeConfig(backend="endpoint", endpoint=endpoint, mode="pointwise")
    with pytest.raises(ScratchError, match="judge mode must be pairwise or pointwise, got 'both'"):
        local_judge(Path("unused"), "x", "both")
