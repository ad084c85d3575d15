"""Whole documents, once each (issue 21, item 3): pretrain's rows pack whole documents best-fit, every token of an
epoch is a target exactly once, a long document continues into the next row, a step's rows are a pure function of
(seed, step) whatever the split into ranks and micro batches, and attention stops at document boundaries (a packed
row scores each document as it scores alone)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.llama import Llama
from tasks.common.config import ConfigError, ScratchError, build
from tasks.common.train_config import BatchIndex
from tasks.pretrain import (
    DocumentRows,
    PretrainConfig,
    TokenData,
    document_ids,
    pack_documents,
    packed_rows,
    row_batch,
    val_rows,
)

EOT = 0


def corpus(lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token file and document index of documents of these lengths (each: random ids, then one eot)."""
    rng = np.random.default_rng(seed)
    tokens = np.concatenate([np.append(rng.integers(1, 500, size=n - 1), EOT) for n in lengths]).astype(np.uint16)
    return tokens, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def pieces(packing, row: int) -> list[tuple[int, int]]:
    span = slice(packing.ptr[row], packing.ptr[row + 1])
    return list(zip(packing.start[span].tolist(), packing.length[span].tolist()))


def test_best_fit_takes_the_longest_document_that_fits_the_room_left():
    lengths = np.array([6, 4, 3, 7])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # 0, 6, 10, 13
    p = pack_documents(starts, lengths, np.arange(4), capacity=10, buffer=100)
    assert p.rows == 2
    assert pieces(p, 0) == [(13, 7), (10, 3)]  # the 7 first, then the 3 that fills the row exactly
    assert pieces(p, 1) == [(0, 6), (6, 4)]


def test_a_document_that_fits_nowhere_continues_into_the_next_row():
    lengths = np.array([12, 5, 9])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # 0, 12, 17
    p = pack_documents(starts, lengths, np.arange(3), capacity=10, buffer=100)
    # row 0: the 9 fits, then room 1: nothing fits, the shortest (5) is split: 1 token here, 4 open row 1
    assert pieces(p, 0) == [(17, 9), (12, 1)]
    assert pieces(p, 1) == [(13, 4), (0, 6)]  # the tail, then the 12's head fills the room
    assert pieces(p, 2) == [(6, 6)]  # the 12's tail: the epoch's last, short row
    assert p.rows == 3 == -(-26 // 10)


def test_every_token_is_a_target_exactly_once_per_epoch():
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 90, size=300)
    tokens, index = corpus(lengths.tolist())
    rows = DocumentRows(tokens, index, seq_len=32, per_step=8, seed=5, eot_id=EOT, buffer=50)
    assert rows.rows_per_epoch == -(-len(tokens) // 32)
    p = rows.packing(0)
    covered = np.zeros(len(tokens), dtype=np.int64)
    for s, n in zip(p.start.tolist(), p.length.tolist()):
        covered[s : s + n] += 1
    assert (covered == 1).all()
    out, filled = packed_rows(tokens, p, np.arange(p.rows), 32, EOT)
    assert (filled[:-1] == 33).all() and 1 < filled[-1] <= 33  # full rows but the epoch's last
    # the targets of an epoch's rows are the file's tokens, each once
    targets = np.concatenate([row[1:f] for row, f in zip(out, filled)])
    assert sorted(targets.tolist()) == sorted(tokens.tolist())
    # the first row of an epoch opens with a whole document after an eot
    assert out[0, 0] == EOT and int(p.start[0]) in set(index[:-1].tolist())
    # epochs differ in order, never in content
    assert not np.array_equal(rows.packing(1).start, p.start) and rows.packing(1).length.sum() == len(tokens)


def test_a_row_starts_with_its_context_token_and_pads_only_the_epochs_end():
    tokens, index = corpus([5, 14, 3])  # 22 tokens
    p = pack_documents(index[:-1], np.diff(index), np.arange(3), capacity=8, buffer=10)
    out, filled = packed_rows(tokens, p, np.arange(p.rows), 8, EOT)
    for r, row in enumerate(out):
        first = int(p.start[p.ptr[r]])
        assert row[0] == (tokens[first - 1] if first else EOT)  # the token before the row's first target
    x, y, doc = row_batch(out, filled, EOT, document_mask=True)
    assert (y[:, :-1][y[:, :-1] != -100] == x[:, 1:][y[:, :-1] != -100]).all()
    assert (y[-1, filled[-1] - 1 :] == -100).all() and (y[:-1] != -100).all()
    assert torch.equal(doc, torch.from_numpy(np.cumsum(out[:, :-1] == EOT, axis=1)))
    assert row_batch(out, filled, EOT, document_mask=False)[2] is None


def test_a_steps_rows_are_a_pure_function_of_seed_and_step_whatever_the_split():
    rng = np.random.default_rng(2)
    tokens, index = corpus(rng.integers(2, 60, size=200).tolist())
    a = DocumentRows(tokens, index, 24, 8, seed=3, eot_id=EOT, buffer=20)
    b = DocumentRows(tokens, index, 24, 8, seed=3, eot_id=EOT, buffer=20)  # a resumed run: no history
    step = a.rows_per_epoch // 8 + 1  # a step of the second epoch
    whole = a(BatchIndex(step, 0, 0, 1, 1, 8))
    halves = [b(BatchIndex(step, m, r, 2, 1, 4)) for m, r in ((0, 0), (0, 1))]  # 2 ranks x micro 4
    for i in range(3):
        assert torch.equal(whole[i], torch.cat([h[i] for h in halves]))
    other_seed = DocumentRows(tokens, index, 24, 8, seed=4, eot_id=EOT, buffer=20)
    assert not torch.equal(whole[0], other_seed(BatchIndex(step, 0, 0, 1, 1, 8))[0])
    # consecutive steps read consecutive rows, across the epoch boundary too
    per_epoch = a.rows_per_epoch
    straddle = per_epoch // 8  # holds rows of epoch 0 and of epoch 1 when per_epoch is not a multiple of 8
    rows, _ = a.rows(straddle, range(8))
    packing, order = a.epoch(1)
    first_of_epoch1, _ = packed_rows(tokens, packing, order[:1], 24, EOT)
    assert np.array_equal(rows[per_epoch - straddle * 8], first_of_epoch1[0])
    # rows are read in a shuffled order: best fit's packing order runs from long documents to short ones
    assert sorted(order.tolist()) == list(range(per_epoch)) and order.tolist() != list(range(per_epoch))


def test_too_little_data_for_a_step_fails_naming_the_knobs():
    tokens, index = corpus([10, 10])
    with pytest.raises(ScratchError, match=r"train.bin: 20 tokens fill 3 rows of seq_len = 8 targets, fewer than a"):
        DocumentRows(tokens, index, 8, 4, seed=0, eot_id=EOT, buffer=10)


def test_validation_rows_are_the_validation_documents_packed_in_file_order():
    tokens, index = corpus([30, 50, 20, 70, 40], seed=3)
    data = TokenData({"eot_id": EOT}, tokens, tokens, index, index)
    cfg = PretrainConfig(seq_len=32, val_windows=100)
    rows, filled = val_rows(data, cfg, seed=1)
    assert len(rows) == -(-210 // 32) and rows[0, 0] == EOT
    assert np.concatenate([r[1:f] for r, f in zip(rows, filled)]).tolist().count(EOT) == 5
    few, _ = val_rows(data, PretrainConfig(seq_len=32, val_windows=3), seed=1)
    assert len(few) == 3 and np.array_equal(few, val_rows(data, PretrainConfig(seq_len=32, val_windows=3), 1)[0])
    with pytest.raises(ConfigError, match="pretrain.rows: must be one of"):
        build(PretrainConfig, {"rows": "chunks"}, "pretrain")


def test_attention_stops_at_document_boundaries():
    torch.manual_seed(0)
    model = Llama(ModelConfig.from_preset("tiny")).eval()
    a, b, c = (torch.randint(1, 500, (1, n)) for n in (17, 40, 9))
    row = torch.cat([a, b, c], dim=1)  # (1,66): three documents packed into one row
    doc = torch.from_numpy(document_ids(np.concatenate([[1] * 17, [0] + [1] * 39, [0] + [1] * 8])[None], 0))
    with torch.no_grad():
        packed, _ = model(row, all_logits=True, doc_ids=doc)
        alone = [model(part, all_logits=True)[0] for part in (a, b, c)]
        plain, _ = model(row, all_logits=True)
        one_doc, _ = model(row, all_logits=True, doc_ids=torch.zeros_like(doc))
    # each document's logits are those it gets on its own, at position 0 (RoPE: only relative positions count)
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(packed[:, 17:], plain[:, 17:], atol=1e-3)  # without the mask b sees a
    torch.testing.assert_close(one_doc, plain, rtol=1e-6, atol=1e-6)  # one document = the causal model
    targets = torch.cat([row[:, 1:], torch.full((1, 1), -100)], dim=1)
    model.train()
    _, loss = model(row, targets, doc_ids=doc)
    loss.backward()  # the masked path trains
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="doc_ids is for whole packed rows"):
        model(row[:, :4], doc_ids=doc[:, :4], attention_mask=torch.tensor([[0, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"doc_ids must be \(B,T\)"):
        model(row, doc_ids=doc[:, :10])


def test_a_budget_past_max_epochs_is_cut_to_them():
    from tasks.pretrain import budget_note, epoch_capped

    tokens, index = corpus([100] * 64)  # 6,400 tokens = 25 steps of 4 x 64 per epoch
    data = TokenData({"eot_id": EOT}, tokens, tokens, index, index)
    train = {"batch_size": 4, "micro_batch_size": 4, "max_steps": 0, "max_tokens": 1_000_000, "warmup_steps": 2}
    cfg = build(PretrainConfig, {"seq_len": 64, "max_epochs": 2.0, "train": train}, "pretrain")
    capped = epoch_capped(cfg, data)
    assert (capped.train.max_steps, capped.train.max_tokens) == (50, 0) and capped.seq_len == 64
    assert budget_note(cfg, capped) == " (cut from 3,907 steps by pretrain.max_epochs 2)"
    small = build(PretrainConfig, {"seq_len": 64, "max_epochs": 2.0, "train": {**train, "max_tokens": 10_000}}, "x")
    assert epoch_capped(small, data) is small and budget_note(small, small) == ""
    off = build(PretrainConfig, {"seq_len": 64, "max_epochs": 0, "train": train}, "pretrain")
    assert epoch_capped(off, data) is off
