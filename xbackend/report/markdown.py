"""GitHub markdown pieces shared by report.md and check summaries (tables through `tabulate`)."""

from __future__ import annotations


def _cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; cells are kept as text (no number reformatting) with pipes escaped."""
    from tabulate import tabulate

    return tabulate([[_cell(c) for c in row] for row in rows], headers=[_cell(h) for h in header],
                    tablefmt="github", disable_numparse=True)


def details(summary: str, body: str) -> str:
    """A folded section."""
    return f"<details>\n<summary>{summary}</summary>\n\n{body}\n\n</details>"
