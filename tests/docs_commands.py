"""The shell commands that README.md and docs/*.md show, as a test sees them."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shell_commands(text: str) -> list[str]:
    """Commands of the ```bash blocks: continuation lines joined, comments dropped, `&&` split."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def documented_commands() -> list[tuple[str, str]]:
    """(file name, command) for every command the docs show."""
    return [(doc.name, command) for doc in DOCS for command in shell_commands(doc.read_text())]


def split_redirect(command: str) -> tuple[list[str], str | None]:
    """The words of ``command`` and the file its stdout is redirected to (``> file``), if any."""
    words = shlex.split(command)
    if ">" in words:
        at = words.index(">")
        return words[:at], words[at + 1]
    return words, None
