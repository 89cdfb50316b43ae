"""The paper's published figures (Tables 2-5 of Harrison, Kaandorp and Wang), so a report can put
each of our figures beside the one the paper printed for the same cell.

The figures are facts and ship as data (`paper_tables.csv`, one figure a row, each with its table
and the figure as printed); `tests/test_paper_tables.py` pins every row against the paper's text.
A cell is the paper's when its family, embedding size and training batch size match one of the
paper's rows; Table 4's Original DPR is DPR's released NQ question encoder evaluated as given.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TABLES_FILE = Path(__file__).with_name("paper_tables.csv")
ORIGINAL_DPR = "Original DPR"
# Table 4's Original DPR: the question tower the paper names in section 5.
ORIGINAL_DPR_ENCODER = "dpr-question_encoder-single-nq-base"


@dataclass(frozen=True)
class PaperFigure:
    value: float  # seconds (TTT, PEI), milliseconds (ITA), a fraction (Acc@k, MRR@100)
    printed: str  # as the paper prints it: "2:40" (h:mm), "38.1" (%), ".502"
    tables: tuple[int, ...]  # every table that prints it (BERT-768's retrieval is in Tables 3, 4 and 5)


PaperCell = tuple[str, int, "int | None"]  # family, embedding size, training batch size (None: evaluated as given)


@lru_cache(maxsize=1)
def paper_figures() -> dict[PaperCell, dict[str, PaperFigure]]:
    """Every published figure by cell and metric (collect's column names)."""
    cells: dict[PaperCell, dict[str, PaperFigure]] = {}
    with TABLES_FILE.open(newline="") as handle:
        for row in csv.DictReader(line for line in handle if not line.startswith("#")):
            cell = (row["encoder"], int(row["embedding_size"]), int(row["batch_size"]) if row["batch_size"] else None)
            figures = cells.setdefault(cell, {})
            table = int(row["table"])
            known = figures.get(row["metric"])
            if known is not None and known.value != float(row["value"]):
                raise ValueError(f"{TABLES_FILE}: {cell} {row['metric']} is {known.printed} in Table {known.tables[0]} "
                                 f"but {row['printed']} in Table {table}")
            tables = (known.tables if known else ()) + (table,)
            figures[row["metric"]] = PaperFigure(float(row["value"]), row["printed"], tables)
    return cells


def paper_cell(family: str, embedding_size: int, batch_size: int | None, question_encoder: str, evaluate_only: bool) -> PaperCell | None:
    """The paper's cell a grid cell reproduces, or None where the paper has no such cell."""
    if evaluate_only:
        key: PaperCell = (ORIGINAL_DPR, embedding_size, None) if ORIGINAL_DPR_ENCODER in question_encoder else ("", 0, None)
    else:
        key = (family, embedding_size, batch_size)
    return key if key in paper_figures() else None
