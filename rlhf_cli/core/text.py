"""Text from models and data, made safe to show in a terminal (torch-free).

A model's answer, or a prompt read from a data file, may hold terminal control sequences: ESC sequences that set
the window title, clear the screen, move the cursor or write hyperlinks, and bare controls such as BEL, backspace
or carriage return that overwrite what was shown. `safe_text` removes them all, keeping newlines and tabs, for
every place such text reaches the terminal (chat, generate, training samples, progress and error lines). Files
the toolkit writes (JSONL, saved chats) keep the raw text.

Rich markup is a separate matter: print such text as a `rich.text.Text` (never parsed as markup) or through
`rich.markup.escape`.
"""

from __future__ import annotations

import re

# Whole control sequences, removed with their parameters: CSI (ESC [ or its C1 byte) up to its final character,
# the string sequences OSC, DCS, SOS, PM and APC up to their terminator (BEL, ESC \ or ST), and the other ESC
# sequences (ESC, intermediates, a final character).
_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)"
    r"|\x1b[ -/]*[0-OQ-WYZ\\`-~]"
)
# The start of one of those that the next piece of a stream may still complete.
_UNFINISHED = re.compile(
    r"(?:\x1b[ -/]*|(?:\x1b\[|\x9b)[0-?]*[ -/]*"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*\x1b?)"
)
# What is left of C0 (but newline and tab), DEL, and C1.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_INTRODUCER = re.compile(r"[\x1b\x90\x98\x9b\x9d\x9e\x9f]")
_LONGEST_HELD = 512  # an unterminated sequence longer than this is not waited for


def safe_text(text: str) -> str:
    """`text` without terminal control sequences or control characters, newlines and tabs kept."""
    return _CONTROL.sub("", _SEQUENCE.sub("", text))


class SafeStream:
    """`safe_text` for text that arrives in pieces (a streamed answer): a control sequence split across two pieces
    is removed whole, not shown half. `feed` returns what can be shown now, `flush` the rest."""

    def __init__(self) -> None:
        self.held = ""

    def feed(self, piece: str) -> str:
        text = self.held + piece
        cut = len(text)
        for m in _INTRODUCER.finditer(text, max(0, len(text) - _LONGEST_HELD)):
            if _UNFINISHED.fullmatch(text, m.start()):
                cut = m.start()  # an unfinished sequence: wait for the piece that ends it
                break
        self.held = text[cut:]
        return safe_text(text[:cut])

    def flush(self) -> str:
        rest, self.held = self.held, ""
        return safe_text(rest)
