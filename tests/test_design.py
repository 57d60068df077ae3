"""docs/design.md is the design the code cites: every citation names one of its sections, and no
docstring cites a document that is not in the repository."""

import re

from .helpers import ROOT

DESIGN = ROOT / "docs" / "design.md"
SOURCES = sorted((ROOT / "xbackend").rglob("*.py")) + sorted((ROOT / "tests").glob("*.py"))


def sections() -> set[str]:
    return {m.group(1).strip() for m in re.finditer(r"^#{2,3} (.+)$", DESIGN.read_text(), re.M)}


def test_no_citation_of_a_document_outside_the_repository():
    for path in SOURCES:
        if path.name == "test_design.py":
            continue
        text = path.read_text()
        assert not re.search(r"SPEC\s*§|SPEC\.md|SPEC rule", text), path


def test_every_citation_names_a_section_of_the_design():
    known = sections()
    assert {"Words", "The protocol behind `compare`", "Verdict rules", "Trace format", "Contracts", "Exit codes"} <= known
    cited = 0
    for path in SOURCES:
        for m in re.finditer(r"\(docs/design\.md[,:]\s+([^)]+)\)", path.read_text()):
            for name in re.split(r";\s+", m.group(1)):
                cited += 1
                assert any(k.startswith(" ".join(name.split())) for k in known), (path.name, name, sorted(known))
    assert cited >= 8
