"""Result records -> one table with the paper's columns and the node behind every figure.

One row per repeat (train figures repeat along, index and infer figures are their repeat's),
or with `median=True` one row per cell: the median over repeats, their count and spread.
Only complete records give figures: a stale one (an input or upstream output changed since it
ran) is left out, and the table's `attrs["left_out"]` says which and why, so the table never
pairs a new training time with an old accuracy.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from dpr_hpc.errors import UsageError
from dpr_hpc.fsutil import write_json_atomic
from dpr_hpc.store.layout import RunLayout
from dpr_hpc.planning.plan import Plan, StageJob
from dpr_hpc.provenance import code_label, node_label
from dpr_hpc.store.records import Records
from dpr_hpc.store.bindings import cell_history, superseded
from dpr_hpc.planning.selection import Selection
from dpr_hpc.tracking.status import left_cells_line

CELL_COLUMNS = ["cell_id", "group", "encoder", "embedding_size", "batch_size", "projection"]
FIGURE_COLUMNS = [
    "ttt_s", "pei_s", "encode_s", "index_build_s", "ita_mean_ms", "ita_sd_ms",
    "acc@1", "acc@20", "acc@100", "mrr@100", "answer_acc@1", "answer_acc@20", "answer_acc@100",
]
NODE_COLUMNS = ["train_node", "index_node", "infer_node"]
# What each repeat's index and infer ran on, "index/infer": a median over repeats that differ in
# either is flagged rather than mixed silently.
RAN_ON_COLUMNS = ["precision", "gpu"]
# Which attempt of each stage's job a row's figures come from, "train/index/infer" ("-": no
# record): after a forced rerun (submit --force) the table says it shows the new attempt.
ATTEMPT_COLUMN = "attempt"
# The code each stage's record was made with, "train/index/infer" (provenance.code_label: a
# commit, `+edits` where the checkout had local changes, or a source digest): a median over
# repeats whose index or infer ran different code is flagged like one over different GPUs.
CODE_COLUMN = "code"
SPREAD_OF = {"pei_s": "pei_spread_s", "ita_mean_ms": "ita_mean_spread_ms"}
# A corpus evaluation's figures (the merge record), added only to the tables of a grid with a
# corpus: DPR's answer-matching top-k accuracy over the whole corpus, and MRR@100 against the
# gold passages where the questions file names them. Like the training's, they repeat along
# every repeat's row of their cell.
CORPUS_COLUMNS = ["corpus", "corpus_shards", "corpus_vectors", "corpus_acc@1", "corpus_acc@5", "corpus_acc@20", "corpus_acc@100",
                  "corpus_mrr@100"]
CORPUS_FIGURES = {f"corpus_acc@{k}": f"answer_acc@{k}" for k in (1, 5, 20, 100)} | {"corpus_mrr@100": "mrr@100"}


@dataclass(frozen=True)
class RepeatRecords:
    """One cell's records for one repeat: the training (shared by every repeat) and that
    repeat's index and infer records; None where a record is not complete."""

    cell_id: str
    repeat: int
    train: dict[str, Any] | None
    index: dict[str, Any] | None
    infer: dict[str, Any] | None
    merge: dict[str, Any] | None = None  # the corpus evaluation's, shared by every repeat

    def by_stage(self) -> dict[str, dict[str, Any]]:
        return {stage: r for stage, r in (("train", self.train), ("index", self.index), ("infer", self.infer), ("merge", self.merge)) if r}


@dataclass
class CompleteRecords:
    """Every cell's complete records by repeat, and what was left out and why."""

    repeats: list[RepeatRecords]
    left_out: list[str]
    left_cells: str | None


def complete_records(layout: RunLayout, plan: Plan, selection: Selection | None = None) -> CompleteRecords:
    """The one place that decides which records give figures: complete ones only, of the
    selected cells, with the figures of the selected stages (every one by default)."""
    selection = selection or Selection()
    records = Records(layout.store, plan=plan)
    left_out: list[str] = []
    history = cell_history(layout)

    def read(cell_id: str, job: StageJob) -> dict[str, Any] | None:
        if not selection.picks_stage(job.stage):
            return None
        check = records.check(job)
        if check.complete:
            return check.record
        why = check.reason if check.state != "missing" else superseded(history, plan, job, records)
        if why:
            left_out.append(f"{cell_id} {job.stage} r{job.repeat}: {why}")
        return None

    repeats = [r for cell_id in selection.cell_ids(plan) for r in _cell_records(read, plan, cell_id)]
    return CompleteRecords(repeats, left_out, left_cells_line(layout, plan, records))


def collect_table(layout: RunLayout, plan: Plan, median: bool = False, found: CompleteRecords | None = None,
                  selection: Selection | None = None) -> pd.DataFrame:
    found = found or complete_records(layout, plan, selection)
    rows = [_row(plan, r) for r in found.repeats]
    corpus = CORPUS_COLUMNS if any(cell.corpus is not None for cell in plan.cells) else []
    table = pd.DataFrame(rows, columns=CELL_COLUMNS + ["repeat"] + FIGURE_COLUMNS + NODE_COLUMNS + RAN_ON_COLUMNS + [ATTEMPT_COLUMN, CODE_COLUMN] + corpus)
    table = _median_per_cell(table) if median else table
    table.attrs["left_out"] = list(found.left_out)
    table.attrs["left_cells"] = found.left_cells
    return table


def _cell_records(read: Callable[[str, StageJob], dict[str, Any] | None], plan: Plan, cell_id: str) -> list[RepeatRecords]:
    cell = plan.cell(cell_id)

    def record(stage: str, repeat: int) -> dict[str, Any] | None:
        return read(cell_id, StageJob(stage, plan.keys[cell_id][stage], repeat))

    train = record("train", 0) if not cell.evaluate_only else None
    merged = read(cell_id, plan.cell_jobs(cell_id, "merge")[0]) if cell.corpus is not None else None
    return [
        RepeatRecords(cell_id, repeat, train,
                      record("index", repeat) if repeat < cell.repeats.index else None,
                      record("infer", repeat) if repeat < cell.repeats.infer else None, merged)
        for repeat in range(max(cell.repeats.index, cell.repeats.infer))
    ]


def _row(plan: Plan, found: RepeatRecords) -> dict[str, Any]:
    cell, train, index, infer = plan.cell(found.cell_id), found.train, found.index, found.infer
    row: dict[str, Any] = {
        "cell_id": found.cell_id,
        "group": cell.group,
        "encoder": cell.encoder_label,
        "embedding_size": cell.embedding_size,
        "batch_size": cell.batch_size,
        "projection": (train or {}).get("details", {}).get("projection"),
        "ttt_s": train["timings"]["ttt_s"] if train else None,
        "train_node": node_label(train["node"]) if train else None,
        "repeat": found.repeat,
    }
    if index:
        row.update({k: index["timings"][k] for k in ("pei_s", "encode_s", "index_build_s")})
        row["index_node"] = node_label(index["node"])
    if infer:
        row.update({k: infer["timings"][k] for k in ("ita_mean_ms", "ita_sd_ms")})
        row.update({k: v for k, v in infer["metrics"].items() if k in FIGURE_COLUMNS})
        row["infer_node"] = node_label(infer["node"])
    row["precision"] = _ran_on(index, infer, lambda r: r.get("details", {}).get("precision"))
    row["gpu"] = _ran_on(index, infer, lambda r: r.get("node", {}).get("gpu_name") or "cpu")
    row[ATTEMPT_COLUMN] = "/".join(str(r["attempt"]) if r else "-" for r in (train, index, infer))
    row[CODE_COLUMN] = "/".join((code_label(r["node"]) or "?") if r else "-" for r in (train, index, infer))
    if cell.corpus is not None:
        row.update({"corpus": cell.corpus.label, "corpus_shards": cell.corpus.shards, "corpus_vectors": cell.corpus.vectors})
        merged = (found.merge or {}).get("metrics", {})
        row.update({column: merged.get(metric) for column, metric in CORPUS_FIGURES.items()})
    return row


def _ran_on(index: dict | None, infer: dict | None, value) -> str | None:
    """"index/infer" of one repeat's records, "-" for a stage without a record."""
    if index is None and infer is None:
        return None
    return "/".join(str(value(r)) if r else "-" for r in (index, infer))


def _median_per_cell(table: pd.DataFrame) -> pd.DataFrame:
    out = []
    for cell_id, group in table.groupby("cell_id", sort=False):
        row: dict[str, Any] = {c: group[c].iloc[0] for c in CELL_COLUMNS}
        for column in FIGURE_COLUMNS:
            values = pd.to_numeric(group[column], errors="coerce").dropna()
            row[column] = values.median() if len(values) else None
        row["n_index"] = int(group["pei_s"].notna().sum())
        row["n_infer"] = int(group["ita_mean_ms"].notna().sum())
        for column, spread in SPREAD_OF.items():
            values = pd.to_numeric(group[column], errors="coerce").dropna()
            row[spread] = values.max() - values.min() if len(values) else None
        for column in NODE_COLUMNS:
            row[column.replace("_node", "_nodes")] = ",".join(sorted({str(v) for v in group[column].dropna()})) or None
        row["mixed"] = _mixed_repeats(group)
        row["attempts"] = ",".join(dict.fromkeys(str(v) for v in group[ATTEMPT_COLUMN].dropna())) or None
        row["codes"] = ",".join(dict.fromkeys(str(v) for v in group[CODE_COLUMN].dropna())) or None
        row.update({column: group[column].iloc[0] for column in CORPUS_COLUMNS if column in group.columns})  # once per cell
        out.append(row)
    return pd.DataFrame(out)


def _mixed_repeats(group: pd.DataFrame) -> str | None:
    """A flag for a median over repeats whose index (or infer) stages ran in different
    precisions, on different GPU models or with different code, so that their figures are not
    pooled silently. (The code column also names the training, which every repeat shares.)"""
    flags = []
    for column, stages in [(c, ("index", "infer")) for c in RAN_ON_COLUMNS] + [(CODE_COLUMN, ("train", "index", "infer"))]:
        parts = [str(v).split("/") for v in group[column].dropna()]
        for position in (stages.index("index"), stages.index("infer")):
            values = sorted({part[position] for part in parts if part[position] != "-"})
            if len(values) > 1:
                flags.append(f"{stages[position]} {column}: {', '.join(values)}")
    return "; ".join(flags) or None


FORMATS = ("csv", "md", "json")
JSON_SCHEMA_VERSION = 1
# What the terminal shows first, in this order, as far as the width allows; the files keep every column.
TERMINAL_COLUMNS = ["cell_id", "encoder", "embedding_size", "batch_size", "ttt_s", "pei_s", "ita_mean_ms",
                    "acc@1", "acc@20", "acc@100", "mrr@100", "nodes"]
# A grid with a corpus shows its figures too (its table has these columns only then).
TERMINAL_CORPUS_COLUMNS = ["corpus_acc@20", "corpus_acc@100"]
COLUMN_GAP = "  "
# Short headers for the terminal's sake; `--columns` takes the table's own names.
TERMINAL_HEADERS = {"embedding_size": "ES", "batch_size": "BS", "ttt_s": "TTT_s", "pei_s": "PEI_s", "ita_mean_ms": "ITA_ms"}


def parse_formats(text: str) -> list[str]:
    """`csv,md,json` -> the formats in that order; an unknown one is a usage error."""
    formats = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UsageError(f"--format {text!r}: expected a comma-separated list of {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def write_table(table: pd.DataFrame, out_dir: Path, stem: str, formats: Sequence[str] = ("csv", "md")) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        if fmt == "csv":
            table.to_csv(path, index=False)
        elif fmt == "md":
            path.write_text(markdown(table) + "\n")
        else:
            write_json_atomic(path, table_json(table, stem))
        written.append(path)
    return written


def table_json(table: pd.DataFrame, name: str) -> dict[str, Any]:
    """The table with its schema version and each column's dtype, so that read_table_json gives
    back an equal DataFrame (NaN as null)."""
    rows = json.loads(table.to_json(orient="values", double_precision=15))
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "name": name,
        "columns": [{"name": str(c), "dtype": str(table[c].dtype)} for c in table.columns],
        "rows": rows,
        "left_out": list(table.attrs.get("left_out", [])),
    }


def read_table_json(path: Path) -> pd.DataFrame:
    """A table written by `collect --format json`; another schema version is refused by name."""
    saved = json.loads(Path(path).read_text())
    if not isinstance(saved, dict) or saved.get("schema_version") != JSON_SCHEMA_VERSION:
        raise UsageError(f"{path}: schema_version {saved.get('schema_version') if isinstance(saved, dict) else None!r}, expected {JSON_SCHEMA_VERSION}")
    names = [c["name"] for c in saved["columns"]]
    table = pd.DataFrame(saved["rows"], columns=names)
    for column in saved["columns"]:
        dtype = column["dtype"]
        if dtype != "object":
            table[column["name"]] = table[column["name"]].astype(dtype)
        else:
            table[column["name"]] = table[column["name"]].astype(object).where(table[column["name"]].notna(), None)
    table.attrs["left_out"] = saved.get("left_out", [])
    return table


def markdown(table: pd.DataFrame) -> str:
    """A Markdown table without extra dependencies; figures rounded for reading, not for the CSV.
    A `|` inside a value (an evaluation-only cell's `q | p` encoder label) is escaped, so it
    cannot shift the row's later columns."""
    header = [_escape(str(c)) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_escape(_cell_text(v)) for v in row) + " |")
    return "\n".join(lines)


def terminal_table(table: pd.DataFrame, width: int, columns: Sequence[str] | None = None) -> str:
    """The chosen columns (default TERMINAL_COLUMNS) that fit `width`, in order; a column that
    does not fit is left out (the files have it) and the last line names what was left out."""
    shown = _for_terminal(table)
    default = TERMINAL_COLUMNS[:-1] + TERMINAL_CORPUS_COLUMNS + TERMINAL_COLUMNS[-1:]  # a corpus's figures before the nodes
    wanted = list(columns) if columns else [c for c in default if c in shown.columns]
    unknown = [c for c in wanted if c not in shown.columns]
    if unknown:
        raise UsageError(f"--columns: no column {', '.join(unknown)}; the table has {', '.join(map(str, shown.columns))}")
    texts = {c: [TERMINAL_HEADERS.get(c, str(c))] + [_cell_text(v) for v in shown[c]] for c in wanted}
    fitted, used = [], 0
    for column in wanted:
        column_width = max(len(t) for t in texts[column])
        needed = column_width + (len(COLUMN_GAP) if fitted else 0)
        if used + needed <= width:
            fitted.append(column)
            used += needed
    if not fitted:  # even the first column is wider than the terminal: cut its values
        fitted = wanted[:1]
        texts[fitted[0]] = [t if len(t) <= width else t[: width - 1] + "…" for t in texts[fitted[0]]]
    widths = {c: max(len(t) for t in texts[c]) for c in fitted}
    lines = [COLUMN_GAP.join(texts[c][i].ljust(widths[c]) for c in fitted).rstrip() for i in range(len(shown) + 1)]
    dropped = [c for c in wanted if c not in fitted]
    if dropped:
        lines += textwrap.wrap(f"(too wide for {width} columns: {', '.join(dropped)}; the files have every column)", width)
    return "\n".join(lines)


# Output to a pipe or a file has no width: it gets every column, as the files do.
UNLIMITED_WIDTH = 10_000


def terminal_width() -> int:
    """$COLUMNS where set, else the terminal's width; no limit when the output is not a terminal."""
    if "COLUMNS" not in os.environ and not sys.stdout.isatty():
        return UNLIMITED_WIDTH
    return shutil.get_terminal_size((80, 24)).columns


def _for_terminal(table: pd.DataFrame) -> pd.DataFrame:
    """What the terminal shows: a local encoder by its folder's name (the files keep the path),
    and a `nodes` column with every node a row's figures came from, once each."""
    node_columns = [c for c in table.columns if c.endswith(("_node", "_nodes"))]
    shown = table.copy()
    if "encoder" in shown.columns:
        shown["encoder"] = [" | ".join(Path(part.strip()).name or part for part in str(e).split(" | ")) if e is not None else None
                            for e in shown["encoder"]]
    shown["nodes"] = [",".join(sorted({n for c in node_columns for n in str(row[c]).split(",") if row[c] is not None and not pd.isna(row[c])})) or None
                      for _, row in table.iterrows()]
    return shown


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _cell_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
