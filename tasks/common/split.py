"""The train/validation split every stage after dedup shares: a document is in validation iff a salted hash of its
id falls below `fraction`.

Deciding by the id (not by position, shard or run) makes the split stable: the same document lands on the same
side in every stage, on every rerun, on any number of workers, and whatever else the corpus holds. It is decided
once, by the `tokenizer` stage's params (`tokenizer.val_fraction`, `tokenizer.split_salt`), and written into
`data/tokenizer/meta.json`; later stages read it from there with `load_split()` (never from params of their own),
so validation text never reaches the tokenizer's or the model's training and two stages can never disagree.

Rule: blake2b-64 over UTF-8 `salt + "\\x1f" + id`, read big-endian as an integer h; validation iff
h < floor(fraction * 2**64).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tasks.common.config import ScratchError

RULE = 'blake2b(digest_size=8) of UTF-8 salt + "\\x1f" + id, big-endian; validation iff < floor(fraction * 2**64)'


def is_validation(doc_id: str, fraction: float, salt: str) -> bool:
    """True when document `doc_id` belongs to the validation split (a pure function of its arguments)."""
    digest = hashlib.blake2b(f"{salt}\x1f{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < int(fraction * 2**64)


@dataclass(frozen=True)
class Split:
    """The split as data: what the tokenizer stage writes to its meta.json and later stages read back."""

    fraction: float  # share of documents in validation, 0 < fraction < 1
    salt: str  # a different salt draws a different (equally sized) validation set

    def is_validation(self, doc_id: str) -> bool:
        return is_validation(doc_id, self.fraction, self.salt)

    def as_dict(self) -> dict:
        return {"val_fraction": self.fraction, "salt": self.salt, "rule": RULE}

    @classmethod
    def from_dict(cls, d: dict, where: str = "split") -> Split:
        try:
            return cls(float(d["val_fraction"]), str(d["salt"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ScratchError(f"{where}: not a split record ({e!r}); rerun the tokenizer stage") from None


def load_split(tokenizer_dir: Path) -> Split:
    """The split the tokenizer stage used, from `<tokenizer_dir>/meta.json`."""
    meta = Path(tokenizer_dir) / "meta.json"
    if not meta.is_file():
        raise ScratchError(f"{meta}: missing (run the tokenizer stage first: dvc repro tokenizer)")
    return Split.from_dict(json.loads(meta.read_text()).get("split", {}), f"{meta}: split")
