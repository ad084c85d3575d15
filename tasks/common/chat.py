"""THE chat format of scratchlm: special token names, the Jinja chat template, and its pure-Python twin.

A conversation renders as

    <|system|>\\n{content}<|end|>\\n<|user|>\\n{content}<|end|>\\n<|assistant|>\\n{content}<|end|>\\n

(the system turn is optional; turns repeat), and the generation prompt is `<|assistant|>\\n`. A reply ends at
`<|end|>` (the model emits it; `STOP_TOKENS` lists what generation stops on).

- `CHAT_TEMPLATE` is saved in data/tokenizer/tokenizer_config.json, so `AutoTokenizer.apply_chat_template` gives
  exactly `render_chat(messages)` (tests hold the two together).
- `encode_chat(tokenizer, messages)` gives the ids SFT trains on and a mask that is 1 on assistant content tokens
  and the assistant's `<|end|>`, 0 elsewhere. It encodes every content as plain text (a `<|end|>` typed by a user
  stays text, never a control token) and each piece of template text on its own, the way generation sees it: the
  prompt ends with `<|assistant|>\\n`, so the reply's first token never merges with that newline. For content that
  neither starts with whitespace nor contains a special-token string its ids equal
  `tokenizer(render_chat(messages))`; in those two cases encode_chat's ids are the right ones to train on.

Works with a `tokenizers.Tokenizer` or a 🤗 fast tokenizer (`AutoTokenizer.from_pretrained("data/tokenizer")`).
"""

from __future__ import annotations

from typing import Any

EOT = "<|endoftext|>"
"""End of text: appended after every pretraining document."""
PAD = "<|pad|>"
"""Padding (never trained on)."""
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
"""End of turn: closes every message; the assistant's is trained on, so the model learns to stop."""

SPECIAL_TOKENS: tuple[str, ...] = (EOT, PAD, SYSTEM, USER, ASSISTANT, END)
"""In id order: the tokenizer stage gives them ids 0..5."""
ROLE_TOKENS: dict[str, str] = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
STOP_TOKENS: tuple[str, ...] = (END, EOT)
"""Generation of a reply stops at the first of these."""
GENERATION_PROMPT = f"{ASSISTANT}\n"

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role: ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] ~ '" + END + "\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ASSISTANT + "\\n' -}}{%- endif -%}"
)
"""Jinja twin of render_chat (the role token is `<|role|>`, which ROLE_TOKENS spells out for Python)."""


def check_messages(messages: list[dict[str, Any]]) -> None:
    """Raise ValueError naming the first message that is not {"role": system|user|assistant, "content": str}."""
    if not isinstance(messages, list):
        raise ValueError(f"messages: expected a list of {{role, content}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLE_TOKENS:
            role = m.get("role") if isinstance(m, dict) else m
            raise ValueError(f"messages[{i}]: role must be one of {', '.join(ROLE_TOKENS)}, got {role!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content: expected str, got {type(m.get('content')).__name__}")


def render_chat(messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """The conversation as text, exactly as CHAT_TEMPLATE renders it."""
    check_messages(messages)
    text = "".join(f"{ROLE_TOKENS[m['role']]}\n{m['content']}{END}\n" for m in messages)
    return text + (GENERATION_PROMPT if add_generation_prompt else "")


def encode_chat(
    tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """(ids, assistant_mask) of a conversation; mask[i] = 1 on assistant content tokens and assistant `<|end|>`.

    With add_generation_prompt, the ids end with `<|assistant|>\\n` (mask 0): the prompt to generate a reply from.
    """
    check_messages(messages)
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    special = special_ids(backend)
    newline = encode_plain(backend, "\n")
    ids: list[int] = []
    mask: list[int] = []

    def add(piece: list[int], trained: bool) -> None:
        ids.extend(piece)
        mask.extend([int(trained)] * len(piece))

    for m in messages:
        is_assistant = m["role"] == "assistant"
        add([special[ROLE_TOKENS[m["role"]]]], False)
        add(newline, False)
        add(encode_plain(backend, m["content"]), is_assistant)
        add([special[END]], is_assistant)
        add(newline, False)
    if add_generation_prompt:
        add([special[ASSISTANT]], False)
        add(newline, False)
    return ids, mask


def special_ids(tokenizer: Any) -> dict[str, int]:
    """Special token → id; a clear error when the tokenizer lacks one (not a scratchlm tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    found = {tok: backend.token_to_id(tok) for tok in SPECIAL_TOKENS}
    missing = [tok for tok, i in found.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer has no {', '.join(missing)} token (not trained by the tokenizer stage?)")
    return found


def encode_plain(tokenizer: Any, text: str) -> list[int]:
    """Ids of `text` as plain text: special-token strings in it are encoded as ordinary characters.

    Sets the backend's `encode_special_tokens` for the call and restores it (not safe to share one tokenizer
    object between threads that call this at the same time).
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    before = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        return backend.encode(text, add_special_tokens=False).ids
    finally:
        backend.encode_special_tokens = before
