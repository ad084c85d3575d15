"""tasks/common/alignment.py: rendering, answer-only masks, padding without leaks, pair batches, batching, loading
with counted quarantine, and constraint scoring -- the pieces sft, reward and dpo stand on."""

from __future__ import annotations

import json
import random

import pytest
import torch

from model import Llama, ModelConfig
from model.losses import cross_entropy, sequence_logprobs
from tasks.common import alignment as al
from tasks.common import chat
from tasks.common.train_config import AlignmentData, SamplingConfig
from tasks.sources import builtin, examples
from tests.alignment_fixtures import make_tokenizer
from tests.conftest import CONVERSATION


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> al.ChatTokenizer:
    return al.load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok"), vocab=600, docs=300))


@pytest.fixture(scope="module")
def model(tok) -> Llama:
    torch.manual_seed(0)
    return Llama(ModelConfig.from_preset("tiny", vocab_size=tok.tok.get_vocab_size(), max_seq_len=512)).eval()


# ------------------------------------------------------------------------------------------------ masks


def test_sft_mask_covers_exactly_the_assistant_answers_and_their_end_tokens(tok):
    example = al.encode_sft(tok, CONVERSATION, max_len=1000)
    assert example.ids == tok.tok.encode(chat.render_chat(CONVERSATION), add_special_tokens=False).ids
    trained = [t for t, m in zip(example.ids, example.mask) if m]
    end = tok.end_id
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]  # the two replies
    assert tok.tok.decode(trained, skip_special_tokens=False) == "".join(f"{a}<|end|>" for a in answers)
    assert trained.count(end) == 2
    untrained = tok.tok.decode([t for t, m in zip(example.ids, example.mask) if not m], skip_special_tokens=False)
    prompts = [m["content"] for m in CONVERSATION if m["role"] != "assistant"]  # system, user, user
    for prompt_text in (*prompts, "<|user|>", "<|assistant|>", "<|system|>"):
        assert prompt_text in untrained


def test_prompt_tokens_carry_no_loss(tok, model):
    """Targets are -100 everywhere but the answers, and the loss is the mean CE over the answer tokens only: any
    change to the logits at prompt positions leaves it unchanged."""
    example = al.encode_sft(tok, CONVERSATION, max_len=1000)
    x, y = al.collate_sft([example], tok.pad_id)
    counted = (y != al.IGNORE_INDEX)[0]
    assert counted.tolist() == [bool(m) for m in example.mask[1:]]
    logits, loss = model(x, y)
    by_hand = torch.nn.functional.cross_entropy(logits[0, counted], y[0, counted])
    torch.testing.assert_close(loss, by_hand)
    scrambled = logits.clone()
    scrambled[0, ~counted] = torch.randn_like(scrambled[0, ~counted]) * 10
    torch.testing.assert_close(cross_entropy(scrambled, y), loss)
    logits.detach().requires_grad_(True)
    leaf = logits.detach().requires_grad_(True)
    cross_entropy(leaf, y).backward()
    assert leaf.grad[0, ~counted].abs().max() == 0 and leaf.grad[0, counted].abs().max() > 0


def test_truncation_keeps_the_beginning_and_drops_examples_without_answer(tok):
    ids, _ = chat.encode_chat(tok.tok, CONVERSATION)
    cut = al.encode_sft(tok, CONVERSATION, max_len=len(ids) - 3)
    assert cut.truncated and cut.ids == ids[: len(ids) - 3]
    prompt_len = len(chat.encode_chat(tok.tok, CONVERSATION[:2], add_generation_prompt=True)[0])
    assert al.encode_sft(tok, CONVERSATION[:3], max_len=prompt_len) is None


def test_padded_rows_score_exactly_as_alone(tok, model):
    """Right padding with no attention mask: each row's loss equals its loss in a batch of one."""
    long = al.encode_sft(tok, CONVERSATION, 1000)
    short = al.encode_sft(tok, CONVERSATION[1:3], 1000)
    x, y = al.collate_sft([long, short], tok.pad_id)
    assert x.shape[0] == 2 and (x[1, len(short.ids) :] == tok.pad_id).all()
    logits, _ = model(x, y)
    for row, ex in enumerate((long, short)):
        xi, yi = al.collate_sft([ex], tok.pad_id)
        alone, _ = model(xi, yi)
        n = len(ex.ids) - 1
        torch.testing.assert_close(logits[row, :n], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cross_entropy(logits[row : row + 1], y[row : row + 1]), cross_entropy(alone, yi))


# ------------------------------------------------------------------------------------------------ pairs


def builtin_pairs(n: int = 4, split: str = "train") -> list[dict]:
    return [
        {
            "id": p["id"],
            "prompt_messages": [{"role": "user", "content": p["prompt"]}],
            "chosen": p["chosen"],
            "rejected": p["rejected"],
            "constraints": p["constraints"],
        }
        for p in builtin.generate_preferences(n, 3, split)
    ]


def test_pair_rows_are_prompt_then_reply_with_the_reply_masked_in(tok):
    pair = builtin_pairs(1)[0]
    e = al.encode_pair(tok, pair, 10_000)
    assert e.prompt == chat.encode_chat(tok.tok, pair["prompt_messages"], add_generation_prompt=True)[0]
    assert tok.tok.decode(e.chosen, skip_special_tokens=False) == pair["chosen"] + "<|end|>"
    batch = al.collate_pairs([e], tok.pad_id)
    assert batch.pairs == 1 and batch.ids.shape[0] == 2
    for row, reply in ((0, e.chosen), (1, e.rejected)):
        real = batch.attention_mask[row].bool()
        assert batch.ids[row, real].tolist() == e.prompt + reply
        assert batch.ids[row, batch.response_mask[row].bool()].tolist() == reply
        assert (batch.ids[row, ~real] == tok.pad_id).all()


def test_response_logprobs_sum_the_reply_only_and_ignore_padding(tok, model):
    pairs = [al.encode_pair(tok, p, 10_000) for p in builtin_pairs(3)]
    batch = al.collate_pairs(pairs, tok.pad_id)
    with torch.no_grad():
        together = al.response_logprobs(model, batch)
        for i, e in enumerate(pairs):
            for half, reply in ((0, e.chosen), (1, e.rejected)):
                ids = torch.tensor([e.prompt + reply])
                logits, _ = model(ids[:, :-1], all_logits=True)
                mask = torch.tensor([[0] * (len(e.prompt) - 1) + [1] * len(reply)])
                alone = sequence_logprobs(logits, ids[:, 1:], mask)
                torch.testing.assert_close(together[half * len(pairs) + i], alone[0], atol=1e-4, rtol=1e-5)


def test_long_pairs_keep_the_prompt_end_and_fit(tok):
    pair = builtin_pairs(1)[0]
    full = al.encode_pair(tok, pair, 10_000)
    limit = len(full.prompt) + 20
    cut = al.encode_pair(tok, pair, limit)
    assert cut.truncated
    assert len(cut.prompt) + max(len(cut.chosen), len(cut.rejected)) <= limit
    assert cut.prompt == full.prompt[-len(cut.prompt) :]
    assert len(cut.prompt) == limit // 2  # a long prompt leaves at least half the room to the replies
    same_start = {**pair, "chosen": pair["chosen"] + " And more.", "rejected": pair["chosen"] + " Something else."}
    assert al.encode_pair(tok, same_start, limit) is None  # cut to the room, the two replies are identical


def test_token_kl_is_zero_against_itself_and_positive_otherwise(tok, model):
    batch = al.collate_pairs([al.encode_pair(tok, p, 10_000) for p in builtin_pairs(2)], tok.pad_id)
    with torch.no_grad():
        assert al.token_kl(model, model, batch).abs().max() < 1e-5
        torch.manual_seed(1)
        other = Llama(model.cfg).eval()
        kl = al.token_kl(model, other, batch)
    assert (kl > 0).all()


# ------------------------------------------------------------------------------------------------ batching


def test_length_grouped_batches_partition_and_group_by_length():
    rng = random.Random(0)
    lengths = [rng.randint(10, 300) for _ in range(1000)]
    batches = al.length_grouped_batches(lengths, 16, random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    shuffled = list(range(1000))
    random.Random(2).shuffle(shuffled)
    naive = [shuffled[i : i + 16] for i in range(0, 1000, 16)]
    naive_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in naive) / len(naive)
    assert spread < naive_spread / 4


class _Index:
    def __init__(self, step: int, examples: range) -> None:
        self.step, self.examples = step, examples


def test_step_batches_are_a_function_of_the_step_and_split_without_overlap():
    examples = list(range(100))
    lengths = [(7 * i) % 50 for i in examples]
    a = al.StepBatches(examples, lengths, 8, seed=3, collate=list)
    b = al.StepBatches(examples, lengths, 8, seed=3, collate=list)
    assert [a(_Index(s, range(0, 8))) for s in range(30)] == [b(_Index(s, range(0, 8))) for s in (range(30))]
    halves = a(_Index(5, range(0, 4))) + a(_Index(5, range(4, 8)))
    assert halves == a(_Index(5, range(0, 8))) and len(set(halves)) == 8
    epoch = [i for s in range(a.per_epoch) for i in a(_Index(s, range(0, 8)))]
    assert len(set(epoch)) == len(epoch) == 96
    with pytest.raises(Exception, match="fewer than one step"):
        al.StepBatches(examples[:5], lengths[:5], 8, 0, list)


# ------------------------------------------------------------------------------------------------ loading


def test_loading_splits_and_counts_every_row(tmp_path):
    rows = [
        {"instruction": "Say hi.", "input": "", "output": "Hi."},
        {"question": "2+2?", "answer": "4"},
        {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hey."}]},
        {"instruction": "No output"},
        {"messages": [{"role": "user", "content": "Only a question"}]},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    cfg = AlignmentData(
        ["builtin:instructions", str(path)], builtin_train=5, builtin_val=2, data_seed=1, val_fraction=0
    )
    loaded = examples.load_instruction_data(cfg, tmp_path)
    c = loaded.counts()
    assert (c["train_examples"], c["val_examples"], c["quarantined"]) == (8, 2, 4)
    assert c["rows_in"] == 5 + 2 + 7
    assert c["per_source"][str(path)] == {"train": 3, "val": 0, "quarantined": 4}
    assert all(q["location"].startswith("mixed.jsonl:") for q in loaded.quarantine)
    assert {q["location"].split(":")[1] for q in loaded.quarantine} == {"4", "5", "6", "7"}
    assert all(e["id"].startswith("builtin-instr-val") for e in loaded.val)

    everything_val = examples.load_instruction_data(AlignmentData([str(path)], 0, 0, 1, val_fraction=0.999), tmp_path)
    assert len(everything_val.val) == 3 and not everything_val.train


def test_keep_only_moves_rejected_examples_to_quarantine_and_keeps_counts_exact():
    loaded = examples.load_preference_data(AlignmentData(["builtin:preferences"], 6, 2, 5, 0.0), al.Path("."))
    kept = loaded.keep_only("train", lambda p: "too long" if p["id"].endswith(("1", "3")) else None)
    c = loaded.counts()
    assert len(kept) == 4 and c["quarantined"] == 2 and c["rows_in"] == 8
    assert c["per_source"]["builtin:preferences"] == {"train": 4, "val": 2, "quarantined": 2}
    assert c["quarantined_by_reason"] == {"too long": 2}


# ------------------------------------------------------------------------------------------------ scoring


def test_score_answers_counts_constraints_and_whole_answers():
    pairs = list(builtin.generate_preferences(20, 9, "test"))
    good = examples.constraint_scores([p["chosen"] for p in pairs], [p["constraints"] for p in pairs])
    assert good["satisfied"] == 1.0 and good["constraint_rate"] == 1.0
    bad = examples.constraint_scores([p["rejected"] for p in pairs], [p["constraints"] for p in pairs])
    n_constraints = sum(len(p["constraints"]) for p in pairs)
    assert bad["satisfied"] == 0.0
    assert bad["constraint_rate"] == pytest.approx((n_constraints - 20) / n_constraints)
    assert examples.broken_constraint({**pairs[0], "prompt_messages": []}) == builtin.BROKEN_KINDS[pairs[0]["broken"]]


def test_sampling_is_reproducible_and_stops_at_end(tok, model):
    prompts = [p["prompt_messages"] for p in examples.held_out_prompts(3, 1)]
    cfg = SamplingConfig(prompts=3, max_new_tokens=12, temperature=1.0, top_p=1.0, seed=5, batch_size=2)
    first = al.sample_answers(model, tok, prompts, cfg)
    again = al.sample_answers(model, tok, prompts, cfg)
    assert [a.ids for a in first] == [a.ids for a in again]
    assert all(len(a.ids) <= 12 and a.finished == (len(a.ids) < 12) for a in first)
    assert all(tok.end_id not in a.ids for a in first)
    assert all(a.reply(tok.end_id)[-1] == tok.end_id for a in first if a.finished)
