"""Read one chat message from a terminal: a long line or a multi-line paste arrives whole, as one message.

`input()` reads through the terminal's canonical mode, which keeps at most 4095 bytes of a line (the rest is
dropped without a word) and ends the message at every newline, so a pasted page arrives cut, or as one turn per
line. `read_message` reads the terminal a chunk at a time instead (non-canonical mode; echo and erase are done
here) with bracketed paste turned on: text the terminal marks as pasted (ESC[200~ ... ESC[201~) is taken whole,
newlines included, and Enter sends the message. A terminal without bracketed paste still sends a paste in one go,
so a newline that arrives together with more input counts as part of the message too; a newline typed by hand
(nothing follows it within `PASTE_GAP` seconds) sends it.

Editing keys: Backspace, Ctrl-U (clear the message), Ctrl-D on an empty message (EOF), Ctrl-C
(KeyboardInterrupt, the terminal's own signal). Other escape sequences (arrow keys) are ignored. Not a terminal
(piped input): the caller reads lines itself. POSIX only (`termios`); elsewhere `input()` is used.
"""

from __future__ import annotations

import codecs
import importlib.util
import os
import re
import select
import sys

PASTE_ON, PASTE_OFF = "\x1b[?2004h", "\x1b[?2004l"
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"
PASTE_GAP = 0.02  # seconds: input that follows a newline this fast was pasted, not typed
_PRINTABLE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]+")  # everything but control characters (tab is text)
_ESCAPE = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|O.|[^\[O])")


def can_read_messages(stream=None) -> bool:
    """True when `stream` (stdin) is a terminal this module can drive."""
    stream = stream or sys.stdin
    return importlib.util.find_spec("termios") is not None and stream.isatty()  # termios: POSIX only


def read_message(prompt: str, fd: int | None = None, out=None) -> str:
    """One message typed or pasted at `prompt` (without the final newline). Raises EOFError on Ctrl-D at an empty
    message and KeyboardInterrupt on Ctrl-C; the terminal's settings are restored either way."""
    import termios

    fd = sys.stdin.fileno() if fd is None else fd
    out = out or (sys.stdout if sys.stdout.isatty() else sys.stderr)  # the echo belongs on the terminal
    saved = termios.tcgetattr(fd)
    raw = termios.tcgetattr(fd)
    raw[3] &= ~(termios.ICANON | termios.ECHO)  # lflag: byte by byte, no echo by the terminal; signals stay on
    raw[6][termios.VMIN], raw[6][termios.VTIME] = 1, 0
    termios.tcsetattr(fd, termios.TCSADRAIN, raw)
    out.write(PASTE_ON + prompt)
    out.flush()
    try:
        return MessageReader(fd, out).read()
    finally:
        out.write(PASTE_OFF)
        out.flush()
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class MessageReader:
    """The key handling of `read_message`, over a file descriptor that yields the terminal's bytes."""

    def __init__(self, fd: int, out):
        self.fd, self.out = fd, out
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.message: list[str] = []  # pieces of text (a paste is one piece)
        self.pending = ""             # received, not handled yet (a marker may be split across two reads)
        self.pasting = False

    def read(self) -> str:
        while True:
            data = os.read(self.fd, 65536)
            if not data:  # the terminal went away
                raise EOFError
            self.pending += self.decoder.decode(data)
            done = self._handle()
            self.out.flush()
            if done is not None:
                return done

    def _add(self, text: str) -> None:
        if text:
            self.message.append(text)
            self.out.write(text.replace("\n", "\r\n"))

    def _more_waiting(self) -> bool:
        return bool(self.pending) or bool(select.select([self.fd], [], [], PASTE_GAP)[0])

    def _handle(self) -> str | None:
        """Handle what is pending: the finished message, or None when more input is needed."""
        while self.pending:
            if self.pasting:
                end = self.pending.find(PASTE_END)
                if end < 0:  # keep a possible start of the end marker for the next read
                    keep = next((k for k in range(len(PASTE_END) - 1, 0, -1) if self.pending.endswith(PASTE_END[:k])),
                                0)
                    self._add(_newlines(self.pending[:len(self.pending) - keep]))
                    self.pending = self.pending[len(self.pending) - keep:]
                    return None
                self._add(_newlines(self.pending[:end]))
                self.pending, self.pasting = self.pending[end + len(PASTE_END):], False
                continue
            if self.pending.startswith("\x1b"):
                if self.pending.startswith(PASTE_START):
                    self.pending, self.pasting = self.pending[len(PASTE_START):], True
                    continue
                match = _ESCAPE.match(self.pending)
                if match is None and (len(self.pending) < len(PASTE_START) or PASTE_START.startswith(self.pending)):
                    return None  # the rest of the sequence is on its way
                self.pending = self.pending[match.end() if match else 1:]  # arrow keys and the like: ignored
                continue
            run = _PRINTABLE.match(self.pending)
            if run:  # plain text (a paste without markers comes this way too): taken in one piece
                self._add(run.group())
                self.pending = self.pending[run.end():]
                continue
            char, self.pending = self.pending[0], self.pending[1:]
            if char in "\r\n":
                if char == "\r" and self.pending.startswith("\n"):
                    self.pending = self.pending[1:]
                if self._more_waiting():  # a paste without markers: the newline belongs to the message
                    self._add("\n")
                    continue
                self.out.write("\r\n")
                return "".join(self.message)
            if char in "\x7f\b":
                if self.message:
                    last = self.message.pop()[:-1]
                    if last:
                        self.message.append(last)
                    self.out.write("\b \b")
            elif char == "\x15":  # Ctrl-U
                self.out.write("\b \b" * len("".join(self.message).split("\n")[-1]))
                self.message.clear()
            elif char == "\x04":  # Ctrl-D
                if not self.message:
                    raise EOFError
        return None


def _newlines(text: str) -> str:
    """A paste's line breaks as "\\n" (terminals send pasted newlines as CR)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")
