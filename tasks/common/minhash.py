"""Vectorised MinHash: datasketch's signatures for many documents at once, in a few numpy operations.

datasketch's `MinHash.update` costs a hash call and about ten tiny numpy operations per shingle, which is what makes
per-document use slow on real corpora. `MinHasher.signatures` computes the *same* values (a test holds bit
equality with `datasketch.MinHash` for the same `num_perm`, `seed` and `hashfunc`) for a whole batch of documents:

    hv   = hashfunc(shingle) for every shingle of every document        (n_shingles,)      uint32
    hv   = fmix32(hv)                      MurmurHash3 finaliser, datasketch's "affine32" pre-mix
    phv  = hv[:, None] * a + b             wrapping uint32 arithmetic    (n_shingles, num_perm)
    sig  = min of phv over each document's rows                          (n_docs, num_perm)  uint32

with `a, b` drawn exactly as datasketch draws them (`MinHash(num_perm, seed).permutations`). Rows are processed
in chunks, so memory stays at `chunk_rows * num_perm * 4` bytes whatever the batch size.
`lean(sig_row)` wraps a row as a `datasketch.LeanMinHash`, so MinHashLSH and `.jaccard` take our signatures as is.

Shingles are word n-grams of the normalised text (NFKC, lower-cased, punctuation dropped), UTF-8 encoded;
a document shorter than n words is one shingle of all its words, and one without words has no shingles (its
signature is datasketch's empty one: all values 2**32 - 1).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
from datasketch import LeanMinHash, MinHash
from datasketch.hashfunc import sha1_hash32

SCHEME = "affine32"  # datasketch >= 2.0 default: fmix pre-mix, then a * h + b mod 2**32
EMPTY = np.uint32(0xFFFFFFFF)
_WORD = re.compile(r"\w+")
_ASCII_NON_WORD = str.maketrans({c: " " for c in map(chr, range(128)) if not (c.isalnum() or c == "_")})
_FMIX = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))


def normalise(text: str) -> str:
    """The text exact-duplicate detection compares: NFKC, lower-cased, whitespace runs collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def words(text: str) -> list[str]:
    """Lower-cased words (`\\w+` runs) of the NFKC text, punctuation dropped: what shingles are built from."""
    text = unicodedata.normalize("NFKC", text).lower()
    if text.isascii():  # the common case, ~3x faster than the regex and equal to it on ASCII
        return text.translate(_ASCII_NON_WORD).split()
    return _WORD.findall(text)


def shingles(text: str, n: int) -> list[bytes]:
    """Distinct word n-grams of `text`, UTF-8 encoded, in first-seen order."""
    ws = words(text)
    if not ws:
        return []
    if len(ws) <= n:
        return [" ".join(ws).encode()]
    return [s.encode() for s in dict.fromkeys(" ".join(ws[i : i + n]) for i in range(len(ws) - n + 1))]


def fmix32(hv: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser (datasketch's pre-mix of every input hash), element-wise on uint32."""
    s1, m1, s2, m2, s3 = _FMIX
    hv = hv ^ (hv >> s1)
    hv = hv * m1
    hv = hv ^ (hv >> s2)
    hv = hv * m2
    return hv ^ (hv >> s3)


def _fmix32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


_FOLD_SEED = 0x9E3779B9


def ngram_hash32(shingle: bytes) -> int:
    """A datasketch `hashfunc` for word n-gram shingles: the words' SHA-1 hashes folded through fmix32.

    Hashing each distinct word once and folding in numpy is what makes `MinHasher.text_signatures` fast;
    this scalar form is the same function, so `MinHash(hashfunc=ngram_hash32)` gives the same signatures."""
    acc = _FOLD_SEED
    for word in shingle.split(b" "):
        acc = _fmix32_int(acc ^ sha1_hash32(word))
    return acc


class MinHasher:
    """Signatures of many documents at once, equal to datasketch's `MinHash(num_perm, seed, hashfunc)`."""

    def __init__(self, num_perm: int = 128, seed: int = 1, chunk_rows: int = 1 << 12) -> None:
        self.num_perm, self.seed, self.chunk_rows = num_perm, seed, chunk_rows
        a, b = MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME).permutations
        self.a = a.astype(np.uint32)[None, :]  # (1, num_perm)
        self.b = b.astype(np.uint32)[None, :]  # (1, num_perm)

    def text_signatures(self, texts: Sequence[str], n: int) -> np.ndarray:
        """Signatures of the word n-gram shingles of `texts` with hashfunc=ngram_hash32 → (n_docs, num_perm).

        Equal to `MinHash(num_perm, seed, hashfunc=ngram_hash32)` updated with every `shingles(text, n)`."""
        doc_words = [words(t) for t in texts]
        vocab: defaultdict[str, int] = defaultdict(itertools.count().__next__)  # word → id, first-seen order
        ids = np.array(list(map(vocab.__getitem__, itertools.chain.from_iterable(doc_words))), dtype=np.int64)
        tokens = sha1_32_many([w.encode() for w in vocab])[ids]  # (n_tokens,) word hashes
        lengths = np.fromiter(map(len, doc_words), dtype=np.int64, count=len(doc_words))  # (n_docs,)
        # One window per n-gram start; a document shorter than n words is one window of all its words.
        n_windows = np.where(lengths >= n, lengths - n + 1, lengths > 0)  # (n_docs,)
        owner = np.repeat(np.arange(len(texts)), n_windows)  # (n_windows,)
        doc_start = np.cumsum(lengths) - lengths
        window_start = doc_start[owner] + _ranks(n_windows)  # (n_windows,) token index
        width = np.minimum(lengths, n)[owner]  # (n_windows,)
        acc = np.full(len(owner), _FOLD_SEED, dtype=np.uint32)
        with np.errstate(over="ignore"):
            for k in range(n):
                take = k < width
                mixed = fmix32(acc ^ tokens[np.minimum(window_start + k, max(len(tokens) - 1, 0))])
                acc = np.where(take, mixed, acc)
        return self._minhash(acc, owner, len(texts))

    def signatures(self, docs: Sequence[Sequence[bytes]], hashfunc: Callable[[bytes], int] = sha1_hash32) -> np.ndarray:
        """Signatures of explicit shingle sets → (n_docs, num_perm); equal to `MinHash(num_perm, seed,
        hashfunc)` updated with each set (the general path: one hashfunc call per shingle)."""
        counts = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        flat = [s for d in docs for s in d]
        if hashfunc is sha1_hash32:
            hv = sha1_32_many(flat)
        else:
            hv = np.fromiter((hashfunc(s) for s in flat), dtype=np.uint64, count=len(flat)).astype(np.uint32)
        return self._minhash(hv, np.repeat(np.arange(len(docs)), counts), len(docs))

    def _minhash(self, hv: np.ndarray, owner: np.ndarray, n_docs: int) -> np.ndarray:
        """Min over each document's rows of the permuted hashes; `owner` (sorted) names each row's document."""
        sig = np.full((self.num_perm, n_docs), EMPTY, dtype=np.uint32)  # transposed: reduceat runs along rows
        a, b = self.a.T, self.b.T  # (num_perm, 1)
        with np.errstate(over="ignore"):
            hv = fmix32(hv.astype(np.uint32))
            for lo in range(0, len(hv), self.chunk_rows):
                rows = owner[lo : lo + self.chunk_rows]
                phv = a * hv[None, lo : lo + self.chunk_rows]  # (num_perm, rows), wraps mod 2**32
                phv += b
                starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
                docs_here = rows[starts]
                sig[:, docs_here] = np.minimum(sig[:, docs_here], np.minimum.reduceat(phv, starts, axis=1))
        return np.ascontiguousarray(sig.T)  # (n_docs, num_perm)

    def lean(self, row: np.ndarray) -> LeanMinHash:
        """A signature row as a datasketch LeanMinHash (for MinHashLSH and `.jaccard`)."""
        return LeanMinHash(seed=self.seed, hashvalues=row, scheme=SCHEME)


def sha1_32_many(items: Sequence[bytes]) -> np.ndarray:
    """datasketch's sha1_hash32 over many byte strings → (n,) uint32, in one buffer."""
    sha1 = hashlib.sha1
    return np.frombuffer(b"".join([sha1(s).digest()[:4] for s in items]), dtype="<u4").astype(np.uint32)


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0, 1, .., c-1 for each count c, concatenated: [2, 3] → [0, 1, 0, 1, 2]."""
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    return np.arange(total) - np.repeat(starts, counts)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Jaccard estimates of paired signature rows: the fraction of equal values → (n_pairs,) float."""
    return (np.atleast_2d(a) == np.atleast_2d(b)).mean(axis=1)


def pair_jaccard(signatures: np.ndarray, pairs: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """`estimated_jaccard` of the rows of each (i, j) in `pairs` (n_pairs, 2) → (n_pairs,) float, `chunk` pairs
    at a time: gathering every pair's two rows at once costs 2 x n_pairs x num_perm x 4 bytes (1.5 GB for 1.5 M
    candidate pairs at num_perm=128), a chunk 64 MB."""
    out = np.empty(len(pairs), dtype=np.float64)
    for start in range(0, len(pairs), chunk):
        i, j = pairs[start : start + chunk, 0], pairs[start : start + chunk, 1]
        out[start : start + chunk] = estimated_jaccard(signatures[i], signatures[j])
    return out


# ------------------------------------------------------------------------------------------------ LSH banding


@functools.cache
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) that datasketch's MinHashLSH picks for `threshold` and `num_perm` (equal FP/FN weights)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def band_candidate_pairs(
    signatures: np.ndarray, bands: int, rows: int, positions: np.ndarray | None = None
) -> np.ndarray:
    """Every pair of rows equal on all `rows` values of at least one of the first `bands` bands → (n_pairs, 2)
    int64, i < j, sorted: the pairs MinHashLSH(params=(bands, rows)) returns from `query` after `insert`ing
    every row (a test holds it), found by sorting each band instead of one dict insert per band and row.
    With `positions` (m,), only those rows take part and the pairs index `positions` (0..m-1): the same pairs as
    `band_candidate_pairs(signatures[positions], ...)` without copying the signatures, one band at a time.

    A bucket of k rows yields k(k-1)/2 pairs; identical texts should be removed before (dedup's exact pass)."""
    found = [np.zeros((0, 2), dtype=np.int64)]
    for band in range(bands):
        cols = signatures[:, band * rows : (band + 1) * rows]  # (n, rows) uint32, a view
        if positions is not None:
            cols = cols[positions]  # (m, rows): this band's columns of the rows taking part
        key = _band_key(cols)
        order = np.argsort(key, kind="stable")  # equal keys adjacent
        key = key[order]
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])  # bucket starts in `order`
        sizes = np.diff(np.r_[starts, len(order)])
        pairs = [np.stack([order[starts[sizes == 2]], order[starts[sizes == 2] + 1]], axis=1)]
        for start, size in zip(starts[sizes > 2].tolist(), sizes[sizes > 2].tolist()):
            i, j = np.triu_indices(size, k=1)
            pairs.append(np.stack([order[start + i], order[start + j]], axis=1))
        pairs = np.concatenate(pairs)
        exact = (cols[pairs[:, 0]] == cols[pairs[:, 1]]).all(axis=1)  # drop 64-bit key collisions
        found.append(np.sort(pairs[exact], axis=1).astype(np.int64))
    return np.unique(np.concatenate(found), axis=0)


def _band_key(cols: np.ndarray) -> np.ndarray:
    """A 64-bit key per row of a band (polynomial in its values): equal rows, equal keys → (n,) uint64."""
    key = np.zeros(len(cols), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for c in range(cols.shape[1]):
            key = key * np.uint64(0x9E3779B97F4A7C15) + cols[:, c].astype(np.uint64)
    return key
