"""Reading FASTA files: the one FASTA reader of the pipeline."""
from __future__ import annotations

from pathlib import Path


def read_fasta(path: str | Path) -> list[tuple[str, str]]:
    """(id, sequence) pairs; id = the header's first word. Whitespace inside sequences is ignored."""
    recs, name, chunks = [], None, []
    text = Path(path).read_text(errors="replace")
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(">"):
            if name is not None:
                recs.append((name, "".join(chunks)))
            name, chunks = (line[1:].split() or [f"record_{len(recs) + 1}"])[0], []
        elif line and name is not None:
            chunks.append("".join(line.split()))
    if name is not None:
        recs.append((name, "".join(chunks)))
    return recs
