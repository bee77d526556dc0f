"""Writing one script's section of benchmarks/RESULTS.md, and the context a result needs
(stdlib only, so any script can import it).

Several scripts share the file; each owns the text between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` and replaces only that.
"""

from __future__ import annotations

import contextlib
import fcntl
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def write_section(path: Path | str, name: str, body: str) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path``.

    Creates ``path`` (with a ``# Benchmark results`` title) if it is missing and appends the
    section if it has no markers yet; every other section is kept byte for byte. The file is
    locked while it is rewritten, since several scripts write to it.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{body.strip()}\n{end}"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            text = f.read()
            i, j = text.find(start), text.find(end)
            if i >= 0 and j > i:
                text = text[:i] + section + text[j + len(end):]
            else:
                if not text.strip():
                    text = "# Benchmark results\n"
                text = text.rstrip("\n") + "\n\n" + section + "\n"
            f.seek(0)
            f.truncate()
            f.write(text)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
