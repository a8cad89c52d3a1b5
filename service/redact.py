"""What a client sees of the server's file system: nothing (house rule: a client never names
a server path, and is never shown one either).

Applied where client-visible data is written, so every reader (API, console, certificate)
gets it clean: `record_event` (event payloads), `finish_job` (failure messages) and
`service.recording` (the served copies of the JSON artifacts).

- `scrub_text`: every absolute path in a text replaced: a known one (the runner's model
  directory...) by its client-facing name, any other by `<server path>`.
- `scrub_json`: `scrub_text` over every string (and key) of a JSON value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

SERVER_PATH = "<server path>"
# Characters that end a path inside a message: blanks, quotes, brackets, separators.
_STOP = r"\s'\"`<>|,;:()\[\]{}"
# An absolute (or home-relative) path: not the tail of a word, a URL ("https://h/x") or a
# ratio ("1/2"), and at least one character after its first slash ("a / b" is no path).
_PATH = re.compile(rf"(?<![\w:/.~-])~?/[^{_STOP}/][^{_STOP}]*")


def scrub_text(text: str, known: Mapping[str, str] | None = None) -> str:
    """`text` with no server path in it: each `known` path (and what lies under it) named by
    its client-facing name, then every other absolute path as `<server path>`."""
    known = known or {}
    for path in sorted(known, key=len, reverse=True):  # the longest (innermost) first
        if path.startswith(("/", "~")) and path.rstrip("/"):
            name = known[path]
            # the path itself or a file under it, never a longer sibling (/m/a vs /m/ab)
            text = re.sub(rf"{re.escape(path.rstrip('/'))}(?=$|[/{_STOP}])",
                          lambda _m, name=name: name, text)  # fmt: skip
    return _PATH.sub(SERVER_PATH, text)


def scrub_json(
    value: Any, known: Mapping[str, str] | None = None, max_chars: int | None = None
) -> Any:
    """A JSON value with `scrub_text` applied to every string in it (keys included). With
    `max_chars`, a string that fitted it before still fits after (a short path replaced by
    the longer `<server path>` must not make a valid event payload too long)."""
    if isinstance(value, str):
        out = scrub_text(value, known)
        if max_chars is not None and len(out) > max_chars >= len(value):
            out = out[:max_chars]
        return out
    if isinstance(value, Mapping):
        return {
            (scrub_json(k, known, max_chars) if isinstance(k, str) else k): scrub_json(
                v, known, max_chars
            )
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [scrub_json(v, known, max_chars) for v in value]
    return value


__all__ = ["SERVER_PATH", "scrub_json", "scrub_text"]
