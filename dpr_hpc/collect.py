"""Result records -> one table with the paper's columns and the node behind every figure.

One row per repeat (train figures repeat along, index and infer figures are their repeat's),
or with `median=True` one row per cell: the median over repeats, their count and spread.
Only complete records give figures: a stale one (an input or upstream output changed since it
ran) is left out, and the table's `attrs["left_out"]` says which and why, so the table never
pairs a new training time with an old accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pandas as pd

from dpr_hpc.layout import RunLayout
from dpr_hpc.plan import Plan, StageJob
from dpr_hpc.provenance import node_label
from dpr_hpc.results import Records
from dpr_hpc.runstate import cell_history, superseded
from dpr_hpc.status import left_cells_line

CELL_COLUMNS = ["cell_id", "group", "encoder", "embedding_size", "batch_size", "projection"]
FIGURE_COLUMNS = [
    "ttt_s", "pei_s", "encode_s", "index_build_s", "ita_mean_ms", "ita_sd_ms",
    "acc@1", "acc@20", "acc@100", "mrr@100", "answer_acc@1", "answer_acc@20", "answer_acc@100",
]
NODE_COLUMNS = ["train_node", "index_node", "infer_node"]
# What each repeat's index and infer ran on, "index/infer": a median over repeats that differ in
# either is flagged rather than mixed silently.
RAN_ON_COLUMNS = ["precision", "gpu"]
SPREAD_OF = {"pei_s": "pei_spread_s", "ita_mean_ms": "ita_mean_spread_ms"}


def collect_table(layout: RunLayout, plan: Plan, median: bool = False) -> pd.DataFrame:
    records = Records(layout.store)
    left_out: list[str] = []
    history = cell_history(layout)

    def record(cell_id: str, job: StageJob) -> dict[str, Any] | None:
        check = records.check(job)
        if check.complete:
            return check.record
        why = check.reason if check.state != "missing" else superseded(history, plan, job, records)
        if why:
            left_out.append(f"{cell_id} {job.stage} r{job.repeat}: {why}")
        return None

    rows = [row for cell in plan.cells for row in _cell_rows(record, plan, cell.cell_id)]
    table = pd.DataFrame(rows, columns=CELL_COLUMNS + ["repeat"] + FIGURE_COLUMNS + NODE_COLUMNS + RAN_ON_COLUMNS)
    table = _median_per_cell(table) if median else table
    table.attrs["left_out"] = left_out
    table.attrs["left_cells"] = left_cells_line(layout, plan, records)
    return table


def _cell_rows(read: Callable[[str, StageJob], dict[str, Any] | None], plan: Plan, cell_id: str) -> list[dict[str, Any]]:
    cell = plan.cell(cell_id)

    def record(stage: str, repeat: int) -> dict[str, Any] | None:
        return read(cell_id, StageJob(stage, plan.keys[cell_id][stage], repeat))

    train = record("train", 0) if not cell.evaluate_only else None
    base: dict[str, Any] = {
        "cell_id": cell_id,
        "group": cell.group,
        "encoder": cell.encoder_label,
        "embedding_size": cell.embedding_size,
        "batch_size": cell.batch_size,
        "projection": (train or {}).get("details", {}).get("projection"),
        "ttt_s": train["timings"]["ttt_s"] if train else None,
        "train_node": node_label(train["node"]) if train else None,
    }
    rows = []
    for repeat in range(max(cell.repeats.index, cell.repeats.infer)):
        row = {**base, "repeat": repeat}
        index = record("index", repeat) if repeat < cell.repeats.index else None
        infer = record("infer", repeat) if repeat < cell.repeats.infer else None
        if index:
            row.update({k: index["timings"][k] for k in ("pei_s", "encode_s", "index_build_s")})
            row["index_node"] = node_label(index["node"])
        if infer:
            row.update({k: infer["timings"][k] for k in ("ita_mean_ms", "ita_sd_ms")})
            row.update({k: v for k, v in infer["metrics"].items() if k in FIGURE_COLUMNS})
            row["infer_node"] = node_label(infer["node"])
        row["precision"] = _ran_on(index, infer, lambda r: r.get("details", {}).get("precision"))
        row["gpu"] = _ran_on(index, infer, lambda r: r.get("node", {}).get("gpu_name") or "cpu")
        rows.append(row)
    return rows


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
        out.append(row)
    return pd.DataFrame(out)


def _mixed_repeats(group: pd.DataFrame) -> str | None:
    """A flag for a median over repeats whose index (or infer) stages ran in different
    precisions or on different GPU models, so that their figures are not pooled silently."""
    flags = []
    for column in RAN_ON_COLUMNS:
        pairs = [str(v).split("/") for v in group[column].dropna()]
        for position, stage in enumerate(("index", "infer")):
            values = sorted({pair[position] for pair in pairs if pair[position] != "-"})
            if len(values) > 1:
                flags.append(f"{stage} {column}: {', '.join(values)}")
    return "; ".join(flags) or None


def write_table(table: pd.DataFrame, out_dir: Path, stem: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    table.to_csv(csv_path, index=False)
    md_path.write_text(markdown(table) + "\n")
    return csv_path, md_path


def markdown(table: pd.DataFrame) -> str:
    """A Markdown table without extra dependencies; figures rounded for reading, not for the CSV."""
    header = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_cell_text(v) for v in row) + " |")
    return "\n".join(lines)


def _cell_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
