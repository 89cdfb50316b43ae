"""Results as a pandas DataFrame for notebooks: the table's columns and every recorded field.

    from dpr_hpc import load_results
    df = load_results("jobs/demo.yaml")          # one row per cell x repeat
    df.groupby("encoder")["mrr@100"].median()

Besides collect's columns, each stage's record is flattened under its stage's name with dots:
`train.details.precision`, `train.details.batch_size_choice.method`, `train.details.restarts`,
`index.timings.peak_rss_mb`, `infer.node.gpu_name`, `infer.node.libraries.torch`, `train.key`,
and so on; the cell's settings once, under `config.`. Lists (segments, epoch losses) stay
lists. Only complete records give values, as in `collect`.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from dpr_hpc.planning.plan import Plan
from dpr_hpc.reporting.collect import CompleteRecords, collect_table, complete_records
from dpr_hpc.store.layout import RunLayout

# The columns the README promises; a test pins them.
DOCUMENTED_COLUMNS = (
    "cell_id", "encoder", "embedding_size", "batch_size", "repeat", "ttt_s", "pei_s", "ita_mean_ms",
    "acc@1", "acc@20", "acc@100", "mrr@100", "train.key", "train.details.precision", "train.details.batch_size",
    "train.details.batch_size_choice.source", "train.details.restarts", "train.details.segments", "train.timings.peak_rss_mb",
    "index.timings.peak_rss_mb", "infer.node.hostname", "infer.node.libraries.torch", "infer.key",
)


def run_frame(layout: RunLayout, plan: Plan, median: bool = False) -> pd.DataFrame:
    """Every complete record of a run's cells, one row per cell and repeat (or per cell with
    `median=True`: numeric columns their median over repeats, others their distinct values
    joined by commas, with `n_index` and `n_infer`). `dpr_hpc.load_results` finds the run."""
    found = complete_records(layout, plan)
    frame = results_frame(collect_table(layout, plan, found=found), found)
    return median_frame(frame) if median else frame


def results_frame(table: pd.DataFrame, found: CompleteRecords) -> pd.DataFrame:
    """collect's per-repeat table with every record flattened beside it."""
    extra = pd.DataFrame([{"cell_id": r.cell_id, "repeat": r.repeat, **flatten_records(r.by_stage())} for r in found.repeats])
    if extra.empty:
        return table
    frame = table.merge(extra, on=["cell_id", "repeat"], how="left")
    frame.attrs.update(table.attrs)
    return frame


def flatten_records(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for stage, record in records.items():
        _flatten(stage, {k: v for k, v in record.items() if k != "config"}, flat)
    for record in records.values():
        _flatten("config", record.get("config", {}), flat)
        break
    return flat


def median_frame(frame: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for cell_id, group in frame.groupby("cell_id", sort=False):
        row: dict[str, Any] = {"cell_id": cell_id, "n_index": int(group["pei_s"].notna().sum()), "n_infer": int(group["ita_mean_ms"].notna().sum())}
        for column in frame.columns:
            if column in ("cell_id", "repeat"):
                continue
            values = group[column].dropna()
            if pd.api.types.is_numeric_dtype(group[column]) and not pd.api.types.is_bool_dtype(group[column]):
                row[column] = values.median() if len(values) else None
            else:
                distinct = list(dict.fromkeys(str(v) if isinstance(v, (list, dict)) else v for v in values))
                row[column] = distinct[0] if len(distinct) == 1 else (",".join(map(str, distinct)) if distinct else None)
        rows.append(row)
    return pd.DataFrame(rows)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}", inner, out)
    else:
        out[prefix] = value
