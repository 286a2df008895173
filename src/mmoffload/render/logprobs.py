"""The per-token logprobs a rollout recorded, kept only where they are the rendered tokens'.

OpenAI chat logprobs (``logprobs.content``) are one entry per generated token:
``{"token": TEXT, "logprob": X, ...}``; vLLM writes ``token`` as ``token_id:N`` when
asked for ids. An entry matches a rendered token when it names the same id, or
when its text is that token decoded. Anything else (a different count, a different
token: the rendered text re-tokenized otherwise than it was sampled) drops the
node's logprobs as a whole: a sampled node then records none, and ``refs`` counts it.
"""

from __future__ import annotations

from typing import Any

_ID_PREFIX = "token_id:"


def matched_logprobs(entries: list[Any] | None, tokens: list[int], tokenizer: Any) -> list[float] | None:
    """Return one logprob per generated token when ``entries`` record exactly ``tokens``, else None."""
    if entries is None or len(entries) != len(tokens):
        return None
    logprobs: list[float] = []
    for entry, token in zip(entries, tokens, strict=True):
        if not isinstance(entry, dict) or not _same_token(entry.get("token"), token, tokenizer):
            return None
        value = entry.get("logprob")
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        logprobs.append(float(value))
    return logprobs


def _same_token(recorded: object, token: int, tokenizer: Any) -> bool:
    if not isinstance(recorded, str):
        return False
    if recorded.startswith(_ID_PREFIX):
        return recorded[len(_ID_PREFIX) :] == str(token)
    return tokenizer.decode([token], skip_special_tokens=False) == recorded
