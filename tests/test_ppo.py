"""The ppo stage: advantages (PPO's GAE with the KL in the reward, GRPO's group normalisation, RLOO's leave-one-out),
the minibatch schedule, the KL controller, the loss at the rollout point, prompt loading with its quarantine, and the
stage end to end on the tiny test world (it learns, it resumes exactly, GSM8K rows run)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from model import Llama, ModelConfig
from model.heads import PolicyWithValue
from tasks import ppo
from tasks.common import alignment as al
from tasks.common.config import ConfigError
from tasks.common.train_config import BatchIndex, SamplingConfig, TrainConfig
from tasks.sources.examples import checker_score, load_prompt_data
from tests.alignment_fixtures import EVAL, cached_stage, reward_config, run_stage, sft_config, stage_root


def config(**changes) -> ppo.PpoConfig:
    base = dict(
        train=TrainConfig(batch_size=2, micro_batch_size=2, max_steps=2, warmup_steps=0, log_every=1),
        group_size=2,
        minibatches=2,
    )
    return ppo.PpoConfig(**{**base, **changes})


def chunk(score: list[float], lengths: list[int], T: int = 6) -> dict:
    """A chunk with rows whose answers are the last `lengths[i]` real positions of T-1 prediction slots."""
    R = len(score)
    response = torch.zeros(R, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        response[i, 2 : 2 + n] = 1
    return {
        "ids": torch.ones(R, T, dtype=torch.long),
        "attention_mask": (response.cumsum(-1) > 0).long() | (torch.arange(T) < 2).long(),
        "response_mask": response,
        "old_logprobs": torch.full((R, T - 1), -1.0),
        "ref_logprobs": torch.full((R, T - 1), -1.5),
        "score": torch.tensor(score),
        "kl_seq": torch.tensor([0.5 * n for n in lengths]),
        "old_values": torch.zeros(R, T - 1),
    }


def rollouts_for(cfg: ppo.PpoConfig) -> ppo.Rollouts:
    r = ppo.Rollouts.__new__(ppo.Rollouts)
    r.cfg, r.kl = cfg, ppo.KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return r


def test_grpo_advantages_are_the_group_normalised_scores_on_every_answer_token():
    c = chunk([1.0, 0.0, 0.5, 0.5], [3, 2, 3, 1])
    adv, returns = rollouts_for(config(algorithm="grpo")).advantages(c)
    mask = c["response_mask"][:, 1:].float()
    assert returns is None
    assert adv[0][mask[0] > 0].tolist() == pytest.approx([0.5 / (math.sqrt(0.5) + 1e-4)] * 3, rel=1e-5)
    assert adv[1][mask[1] > 0].tolist() == pytest.approx([-0.5 / (math.sqrt(0.5) + 1e-4)] * 2, rel=1e-5)  # unbiased std
    assert adv[2].abs().sum() == 0 and adv[3].abs().sum() == 0  # equal scores: nothing to learn from this group
    assert (adv * (1 - mask)).abs().sum() == 0  # prompt and padding positions carry nothing


def test_rloo_subtracts_the_other_answers_mean_of_the_kl_shaped_score():
    c = chunk([1.0, 0.0], [2, 4])
    cfg = config(algorithm="rloo", kl_coef=0.1)
    adv, _ = rollouts_for(cfg).advantages(c)
    shaped = [1.0 - 0.1 * 1.0, 0.0 - 0.1 * 2.0]  # kl_seq = 0.5 per token
    assert float(adv[0][1]) == pytest.approx(shaped[0] - shaped[1])
    assert float(adv[1][1]) == pytest.approx(shaped[1] - shaped[0])


def test_ppo_puts_the_score_on_the_last_token_and_the_kl_on_every_token():
    c = chunk([2.0], [3])
    cfg = config(algorithm="ppo", group_size=1, minibatches=1, kl_coef=0.1, gamma=1.0, lam=1.0)
    adv, returns = rollouts_for(cfg).advantages(c)
    # values are 0, so with gamma = lam = 1 the advantage is the reward still to come: 3 tokens of -0.1 x 0.5 KL,
    # then the score 2.0 on the last one
    mask = c["response_mask"][:, 1:][0] > 0
    assert adv[0][mask].tolist() == pytest.approx([2.0 - 0.15, 2.0 - 0.10, 2.0 - 0.05])
    assert torch.equal(returns, adv)


def test_whitening_spans_every_chunk_and_ignores_padding():
    chunks = {0: {**chunk([0.0], [2]), "advantages": torch.tensor([[0, 1.0, 3.0, 0, 0]])}}
    chunks[1] = {**chunk([0.0], [2]), "advantages": torch.tensor([[0, 5.0, 7.0, 9, 9]])}
    ppo.whiten(chunks)
    values = torch.cat([c["advantages"][c["response_mask"][:, 1:] > 0] for c in chunks.values()])
    assert float(values.mean()) == pytest.approx(0, abs=1e-6) and float(values.std(unbiased=False)) == pytest.approx(1)
    assert chunks[1]["advantages"][0, 3] == 0  # padding stays 0


def test_each_epoch_visits_every_answer_once_in_minibatches():
    rows = 8
    c = chunk([0.0] * rows, [2] * rows)
    c["ids"] = torch.arange(rows)[:, None].repeat(1, 6)  # row r holds token r everywhere
    exp = ppo.Experience({0: c}, minibatches=4, seed=1, step=3)
    seen = []
    for update in range(8):  # 2 epochs x 4 minibatches
        mb = exp.minibatch(BatchIndex(3, 0, 0, 1, 1, 4, update))
        assert mb["ids"].shape[0] == 2 and mb["ids"].shape[1] == mb["old_logprobs"].shape[1] + 1
        seen.append(mb["ids"][:, 0].tolist())
    first, second = sum(seen[:4], []), sum(seen[4:], [])
    assert sorted(first) == sorted(second) == list(range(rows))
    assert first != second  # each epoch has its own order
    again = ppo.Experience({0: c}, minibatches=4, seed=1, step=3).minibatch(BatchIndex(3, 0, 0, 1, 1, 4, 5))
    assert again["ids"][:, 0].tolist() == seen[5]  # a pure function of (seed, step, slot, epoch)


def test_adaptive_kl_moves_toward_its_target_and_its_state_round_trips():
    kl = ppo.KLController(0.1, target=2.0, horizon=10)
    kl.update(4.0)  # too far from the reference: a larger penalty
    assert kl.coef == pytest.approx(0.1 * 1.02)
    kl.update(1.0)
    assert kl.coef == pytest.approx(0.1 * 1.02 * 0.98)
    fixed = ppo.KLController(0.1, target=0.0, horizon=10)
    fixed.update(100.0)
    assert fixed.coef == 0.1
    other = ppo.KLController(0.5, 2.0, 10)
    other.load_state_dict(kl.state_dict())
    assert other.coef == kl.coef


def test_loss_at_the_rollout_point_is_minus_the_mean_advantage_with_nothing_clipped():
    torch.manual_seed(0)
    lm = Llama(ModelConfig.from_preset("tiny", vocab_size=32))
    policy = PolicyWithValue(lm, value_head=True)
    c = chunk([1.0, 0.0], [3, 2])
    c["ids"] = torch.randint(3, 32, c["ids"].shape)
    batch = al.PairBatch(c["ids"], c["attention_mask"], c["response_mask"])
    with torch.no_grad():
        logits, values = policy(batch.ids[:, :-1])
    mask = batch.response_mask[:, 1:].float()
    c["old_logprobs"] = ppo.answer_logprobs(logits, batch, 1.0)
    c["ref_logprobs"] = c["old_logprobs"].clone()
    c["old_values"] = values * mask
    cfg = config(algorithm="ppo", group_size=1, minibatches=1, vf_coef=0.0)
    c["advantages"], c["returns"] = rollouts_for(cfg).advantages(c)
    loss, m = ppo.PolicyLoss(cfg, ppo.KLController(0.05, 0, 1))(policy, c)
    assert loss.item() == pytest.approx(-float((c["advantages"] * mask).sum() / mask.sum()), rel=1e-5)
    assert m["clip_fraction"].item() == 0 and m["approx_kl"].item() == pytest.approx(0, abs=1e-10)
    assert m["kl_k3"].item() == pytest.approx(0, abs=1e-6) and 0 < m["entropy"].item() <= math.log(32) + 1e-5


def test_config_rejects_what_cannot_run():
    with pytest.raises(ConfigError, match="group_size"):
        ppo.PpoConfig(algorithm="grpo", group_size=1)
    with pytest.raises(ConfigError, match="minibatches"):
        config(minibatches=3)
    with pytest.raises(ConfigError, match="max_steps"):
        ppo.PpoConfig(train=TrainConfig(max_steps=0, max_tokens=1000))


def test_prompts_load_from_builtin_and_gsm8k_with_bad_rows_quarantined(tmp_path):
    rows = [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
        {"question": "No answer here", "answer": "none"},
        {"prompt": "Tell a story."},
        {"foo": 1},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    cfg = ppo.PpoConfig(sources=["builtin:prompts", str(path)], builtin_train=5, builtin_val=2, val_fraction=0.0)
    loaded = load_prompt_data(cfg, tmp_path)
    counts = loaded.counts()
    assert counts["rows_in"] == 12 and counts["train_examples"] == 7 and counts["val_examples"] == 2
    assert counts["quarantined"] == 3
    gsm = next(e for e in loaded.train if e.get("answer"))
    assert checker_score(gsm, "so the answer is 7.") == 1.0 and checker_score(gsm, "8") == 0.0
    builtin = loaded.train[0]
    assert builtin["constraints"] and builtin["prompt_messages"][-1]["role"] == "user"


# ------------------------------------------------------------------------------------------------ the stage


def stage_config(**changes) -> ppo.PpoConfig:
    train = TrainConfig(
        batch_size=4, micro_batch_size=4, max_steps=12, lr=5e-5, warmup_steps=1, log_every=2, eval_every=6
    )
    base = dict(
        builtin_train=200,
        builtin_val=16,
        group_size=4,
        minibatches=2,
        max_new_tokens=96,
        sampling=SamplingConfig(**{**EVAL, "prompts": 16}),
        train=train,
    )
    return ppo.PpoConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cached_stage(tmp_path_factory, "sft", sft_config())
    root, _ = cached_stage(tmp_path_factory, "reward", reward_config())
    return root


@pytest.mark.slow
def test_grpo_stage_logs_the_rl_curves_evaluates_and_compares_with_its_start(world, tmp_path):
    """The stage end to end on the tiny world (whose 12-step SFT policy rarely ends an answer: learning is shown on
    the toy reward above and measured on the real pipeline in docs/BENCHMARKS.md)."""
    root = stage_root(tmp_path, world, "sft", "reward")
    m = run_stage("ppo", stage_config(), root)
    assert m["steps"] == 12 and m["algorithm"] == "grpo" and m["rows_in"] == 216
    rows = [json.loads(line) for line in (root / "data/ppo/history.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/reward" in r]
    for key in ("train/reward", "train/kl", "train/entropy", "train/clip_fraction", "train/response_length"):
        assert all(math.isfinite(r[key]) for r in train), key
    assert [r["step"] for r in rows if "val/checker" in r] == [6, 12]
    assert 0 <= m["rollout_checker_last"] <= 1 and m["rollout_tokens_per_s"] > 0 and m["seconds_per_step"] > 0
    assert all(r["train/kl_coef"] == pytest.approx(stage_config().kl_coef) for r in train)  # fixed β
    assert "ppo_satisfaction" in m and "win_rate" in m and isinstance(m["reward_hacking"], bool)
    assert (root / "data/ppo/model/model.safetensors").is_file()


@pytest.mark.slow
def test_ppo_with_a_value_head_on_the_reward_model_resumes_exactly(world, tmp_path):
    cfg = stage_config(
        algorithm="ppo",
        reward="rm",
        group_size=1,
        minibatches=2,
        sampling=SamplingConfig(prompts=0),
        train=TrainConfig(
            batch_size=4,
            micro_batch_size=4,
            max_steps=4,
            lr=5e-5,
            warmup_steps=1,
            log_every=1,
            checkpoint_every=2,
            keep_checkpoints=2,
        ),
    )
    root = stage_root(tmp_path, world, "sft", "reward")
    run_stage("ppo", cfg, root)
    want = (root / "data/ppo/history.jsonl").read_text().splitlines()
    folder = next((root / "checkpoints" / "ppo").iterdir())
    shutil.rmtree(folder / "step_00000004")  # as if killed after the checkpoint of step 2
    (folder / "latest").write_text("step_00000002")
    m = run_stage("ppo", cfg, root)
    assert m["resumed_from_step"] == 2
    got = (root / "data/ppo/history.jsonl").read_text().splitlines()
    assert [untimed(r) for r in got] == [untimed(r) for r in want]  # same rollouts, same updates, bitwise
    last_train = [json.loads(r) for r in got if "train/reward" in r][-1]
    assert last_train["train/value_loss"] > 0 and "train/rm" in last_train


def untimed(line: str) -> dict:
    """A history row without its wall-clock figures (tokens/s, MFU), which no two runs share."""
    return {k: v for k, v in json.loads(line).items() if not k.endswith(("per_s", "mfu"))}


@pytest.mark.slow
def test_grpo_runs_on_gsm8k_questions(world, tmp_path):
    from tests.conftest import shared

    gsm = shared("gsm8k") / "train.jsonl"
    cfg = stage_config(
        sources=[str(gsm)],
        builtin_train=0,
        builtin_val=0,
        val_fraction=0.01,
        sampling=SamplingConfig(prompts=0),
        train=TrainConfig(batch_size=4, micro_batch_size=4, max_steps=2, warmup_steps=0, log_every=1),
    )
    root = stage_root(tmp_path, world, "sft", "reward")
    m = run_stage("ppo", cfg, root)
    assert m["rows_in"] == 7473 and m["rows_in"] == m["train_examples"] + m["val_examples"] + m["quarantined"]
    assert "val_checker" in m and 0.0 <= m["val_checker"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_two_ranks_sample_and_train_as_one_rank_with_accumulation(world, tmp_path, zero_stage):
    """Launched as a user launches it (python -m tasks.ppo → DeepSpeed, gloo ranks): rollouts are seeded by their
    micro-batch slot, so 2 ranks draw the answers 1 rank with 2x accumulation draws, and follow its curve; at ZeRO-3
    each rank samples from a gathered copy of its sharded policy."""
    import subprocess
    import sys

    import yaml

    from tests.test_import_graph import ROOT
    from tests.test_pretrain import stage_env

    histories = {}
    for ranks in (1, 2):
        project = tmp_path / f"ranks{ranks}"
        for folder in ("tasks", "model"):
            shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
        stage_root(project, world, "sft", "reward")
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["ppo"].update(
            builtin_train=40, builtin_val=0, max_new_tokens=48, minibatches=2, group_size=2, sampling={"prompts": 0}
        )
        params["ppo"]["train"] = {
            "ranks": ranks,
            "zero_stage": zero_stage if ranks == 2 else 0,
            # measured: under bf16 autocast ZeRO-3 starts 0.006 nats of KL off its reference; in fp32 the runs agree
            "precision": "fp32" if zero_stage == 3 else "auto",
            "batch_size": 4,
            "micro_batch_size": 2,
            "max_steps": 2,
            "warmup_steps": 0,
            "log_every": 1,
        }
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        done = subprocess.run(
            [sys.executable, "-m", "tasks.ppo"],
            cwd=project,
            env=stage_env(project, SCRATCHLM_NO_MLFLOW="1"),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        rows = [json.loads(line) for line in (project / "data/ppo/history.jsonl").read_text().splitlines()]
        histories[ranks] = {r["step"]: r for r in rows if "train/reward" in r}
    one, two = histories[1], histories[2]
    assert sorted(one) == sorted(two) == [1, 2]
    for key in ("train/reward", "train/checker", "train/response_length"):
        assert two[1][key] == one[1][key], key  # step 1: the same answers, bit for bit
    for key in ("train/loss", "train/kl", "train/reward"):
        assert two[2][key] == pytest.approx(one[2][key], rel=1e-3, abs=1e-6), key


class SevensScorer(ppo.Scorer):
    """A toy verifiable reward: the share of an answer's tokens that are token 7 (chance: 1/vocab)."""

    def __init__(self, cfg: ppo.PpoConfig) -> None:
        super().__init__(cfg, None, None)

    def __call__(self, prompts, answers):
        share = torch.tensor([sum(t == 7 for t in a.ids) / max(len(a.ids), 1) for a in answers])
        return {
            "reward": share,
            "checker": share,
            "rm": torch.zeros(len(answers)),
            "finished": torch.ones(len(answers)),
        }


class ToyTokenizer:
    """Ids as text: what the rollouts need of a tokenizer (stop, end and pad ids, decode) for a 32-token toy."""

    stop_ids, end_id, pad_id = (31,), 31, 0

    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo"])
def test_each_algorithm_learns_a_toy_reward_through_the_trainer(algorithm, tmp_path):
    """The whole loop (rollouts, advantages, minibatch epochs, DeepSpeed updates) on a toy policy: answers of 8
    tokens from a random 32-token Llama, rewarded by their share of token 7. Chance is ~1/32; 15 steps must lift it."""
    from tasks.common.trainer import Recipe, Trainer

    torch.manual_seed(0)
    lm_cfg = ModelConfig.from_preset("tiny", vocab_size=32, max_seq_len=16)
    start = Llama(lm_cfg).eval()
    cfg = config(
        algorithm=algorithm,
        group_size=1 if algorithm == "ppo" else 4,
        minibatches=2,
        max_new_tokens=8,
        kl_coef=0.0,
        train=TrainConfig(batch_size=8, micro_batch_size=8, max_steps=15, lr=3e-3, warmup_steps=0, log_every=1),
    )
    prompts = [ppo.Prompt({"id": str(i)}, [1, 2 + i % 5]) for i in range(16)]
    reference = Llama(lm_cfg).eval().requires_grad_(False)
    reference.load_state_dict(start.state_dict())
    kl = ppo.KLController(cfg.kl_coef, 0.0, 1)

    def build():
        model = Llama(lm_cfg)
        model.load_state_dict(start.state_dict())
        return PolicyWithValue(model, value_head=algorithm == "ppo").train()

    sampler = ppo.SamplingWeights(0, build)
    rollouts = ppo.Rollouts(cfg, prompts, ToyTokenizer(), reference, SevensScorer(cfg), kl, sampler)
    recipe = Recipe(
        ppo.experience_batches, ppo.PolicyLoss(cfg, kl), 10, rollout_fn=rollouts, updates_per_step=4, state=kl
    )
    trainer = Trainer(build, cfg.train, recipe, name=f"toy-{algorithm}", info={"t": algorithm}, root=tmp_path)
    trainer.train(tmp_path / "history.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    rewards = [r["train/reward"] for r in rows if "train/reward" in r]
    assert rewards[0] < 0.15 and max(rewards[-3:]) > 0.4, rewards


def test_report_card_says_when_the_reward_model_was_gamed(tmp_path):
    from tasks.common.dvcio import write_json
    from tasks.common.report import rl_section

    m = {
        "algorithm": "ppo",
        "reward": "rm",
        "init": "sft",
        "steps": 30,
        "prompts_per_step": 8,
        "group_size": 1,
        "seconds_per_step": 2.0,
        "rollout_tokens_per_s": 900.0,
        "rollout_reward_first": 0.1,
        "rollout_reward_last": 0.9,
        "rollout_kl_first": 0.1,
        "rollout_kl_last": 3.0,
        "win_rate": 0.8,
        "kl_to_reference": 3.1,
        "sft_satisfaction": 0.5,
        "ppo_satisfaction": 0.3,
        "sft_reward": 0.1,
        "ppo_reward": 0.9,
    }
    write_json(tmp_path / "metrics" / "all" / "ppo.json", {**m, "reward_hacking": ppo.reward_hacking(m, "sft")})
    text = "\n".join(rl_section(tmp_path))
    assert "**Reward hacking:**" in text and "| reward | 0.100 | 0.900 |" in text
    write_json(tmp_path / "metrics" / "all" / "ppo.json", {**m, "ppo_satisfaction": 0.6, "reward_hacking": False})
    assert "Reward hacking" not in "\n".join(rl_section(tmp_path))
