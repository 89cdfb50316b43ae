"""`dpr-hpc report`: the paper's tables (2-5) and figures (1-5), the hardware variance and the
cost of a grid, as results/<grid>/report.md with PNG figures beside it and a self-contained
report.html (figures embedded).

Every number comes from a complete record (as in `collect`) or from the scheduler's accounting;
a cell without its record shows `missing`, never a guess. Figures are relative to a baseline
cell (the paper's BERT-768, `--baseline FAMILY-SIZE`) where the grid has it, else absolute.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from dpr_hpc.reporting import figures
from dpr_hpc.reporting.collect import CompleteRecords, RepeatRecords, collect_table, complete_records, markdown
from dpr_hpc.reporting.cost import CostTable, cost_table
from dpr_hpc.errors import UsageError
from dpr_hpc.grid import CellConfig
from dpr_hpc.store.layout import RunLayout
from dpr_hpc.tracking.ledger import Ledger
from dpr_hpc.planning.plan import Plan
from dpr_hpc.provenance import node_label
from dpr_hpc.store.records import Records
from dpr_hpc.planning.selection import Selection

# Families by the encoder's name, most specific first (TinyBERT and DistilBERT contain "bert").
FAMILIES = (("tinybert", "TinyBERT"), ("distilbert", "DistilBERT"), ("electra", "ELECTRA"), ("roberta", "RoBERTa"), ("bert", "BERT"))
TIMINGS = {"ttt_s": ("train", "TTT (s)"), "pei_s": ("index", "PEI (s)"), "ita_mean_ms": ("infer", "ITA (ms)")}
RETRIEVAL = {"acc@1": "Acc@1", "acc@20": "Acc@20", "acc@100": "Acc@100", "mrr@100": "MRR@100"}
# The stage whose record gives each figure: a report of some stages (--stage) leaves out the
# columns of the others rather than showing them `missing`, which would read as "not run".
COLUMN_STAGES = {column: stage for column, (stage, _) in TIMINGS.items()} | {"ita_sd_ms": "infer"} | {c: "infer" for c in RETRIEVAL}
MISSING = "missing"


@dataclass(frozen=True)
class ReportOptions:
    baseline: str = "BERT-768"
    variance_factor: float = 1.5
    html: bool = True
    paper: bool = False  # add the paper's published figures beside ours (`report --paper`)


@dataclass(frozen=True)
class Baseline:
    family: str
    size: int
    cell_id: str | None  # None: the grid has no such cell, figures stay absolute

    @property
    def label(self) -> str:
        return f"{self.family}-{self.size}"


def write_report(layout: RunLayout, plan: Plan, out_dir: Path, options: ReportOptions, selection: Selection | None = None) -> list[Path]:
    """The report of the selected cells and stages (every one by default); figures stay
    relative to the baseline cell even when the selection leaves it out."""
    if options.variance_factor <= 1.0:
        raise UsageError(f"--variance-factor {options.variance_factor:g}: expected a factor above 1")
    selection = selection or Selection()
    shown = plan if selection.everything else plan.subset(selection.cell_ids(plan))
    records = Records(layout.store, plan=plan)
    every_cell = complete_records(layout, plan, Selection(stages=selection.stages))
    table = collect_table(layout, plan, found=every_cell)
    table["family"] = [family_of(plan.cell(c)) for c in table["cell_id"]]
    baseline = find_baseline(plan, options.baseline)
    found = _of_cells(every_cell, shown)
    out_dir.mkdir(parents=True, exist_ok=True)

    sections = [f"# Report: grid `{plan.grid_name}`", _baseline_line(baseline)]
    if not selection.everything:
        sections.append(f"Selected: {selection.describe()} ({len(shown.cells)} of {len(plan.cells)} cells).")
    if found.left_out:
        sections.append("Left out (not complete): " + "; ".join(found.left_out))
    pngs: list[Path] = []
    picked = selection.picks_stage
    sections += [efficiency_table(shown, table, baseline, picked), retrieval_table(shown, table, baseline, picked),
                 evaluation_only_table(shown, table, baseline, picked), batch_size_table(shown, table, picked)]
    if any(cell.corpus is not None for cell in shown.cells):
        sections.append(corpus_table(shown, table, picked))
    if options.paper:
        sections += beside_the_paper(shown, table, picked)
    pngs += _token_length_figure(layout, shown, found, out_dir, sections) if picked("index") else _not_selected(sections, TOKEN_LENGTH_TITLE, "index")
    pngs += _metric_figures(shown, table, baseline, out_dir, sections, picked)
    variance = variance_rows(found.repeats, options.variance_factor)
    sections.append(variance_section(variance, options.variance_factor))
    if not variance.empty:
        pngs.append(figures.node_variance(node_points(variance), options.variance_factor, out_dir / "variance.png"))
        sections.append("![hardware variance](variance.png)")
    sections.append(cost_section(cost_table(shown, records, Ledger.read(layout.store))))

    report_md = out_dir / "report.md"
    report_md.write_text("\n\n".join(sections) + "\n")
    written = [report_md, *pngs]
    if options.html:
        written.append(write_html(report_md, out_dir / "report.html"))
    return written


def _of_cells(found: CompleteRecords, plan: Plan) -> CompleteRecords:
    """The records of the plan's cells (left-out notes start with their cell's id)."""
    return replace(found, repeats=[r for r in found.repeats if plan.has_cell(r.cell_id)],
                   left_out=[line for line in found.left_out if plan.has_cell(line.split(" ", 1)[0])])


def family_of(cell: CellConfig) -> str:
    """The paper's family name for a cell's (question) encoder: from a hub name or a folder's."""
    name = Path(cell.question_encoder.rstrip("/")).name
    return next((family for needle, family in FAMILIES if needle in name.lower()), name)


def find_baseline(plan: Plan, spec: str) -> Baseline:
    match = re.fullmatch(r"(.+)-(\d+)", spec.strip())
    if not match:
        raise UsageError(f"--baseline {spec!r}: expected FAMILY-SIZE, e.g. BERT-768")
    family, size = match.group(1), int(match.group(2))
    cells = [c for c in plan.cells if not c.evaluate_only and family_of(c).lower() == family.lower() and c.embedding_size == size]
    return Baseline(family, size, cells[0].cell_id if cells else None)


def _baseline_line(baseline: Baseline) -> str:
    if baseline.cell_id:
        return f"Relative figures are to the baseline {baseline.label}, cell `{baseline.cell_id}` (its median = 1)."
    return f"The grid has no {baseline.label} cell (`--baseline FAMILY-SIZE` names another): figures are absolute."


# --- Tables 2-5 ---------------------------------------------------------------------------

def _values(table: pd.DataFrame, cell_id: str, column: str) -> list[float]:
    """The repeat values of one cell; TTT once (every repeat row carries the one training)."""
    rows = table[table["cell_id"] == cell_id]
    values = pd.to_numeric(rows[column], errors="coerce").dropna().tolist()
    return values[:1] if column == "ttt_s" else values


def _figure(values: list[float], base: list[float] | None) -> tuple[str, str]:
    """'median (n=3, spread 0.4)' and the ratio to the baseline's median, or `missing`."""
    if not values:
        return MISSING, MISSING if base else ""
    median = float(np.median(values))
    text = f"{median:.4g}" + (f" (n={len(values)}, spread {max(values) - min(values):.2g})" if len(values) > 1 else " (n=1)")
    if not base:
        return text, ""
    return text, f"{median / float(np.median(base)):.3g}x"


StagePicked = Callable[[str], bool]


def _every_stage(stage: str) -> bool:
    return True


def _picked_columns(columns: dict[str, str], picked: StagePicked) -> dict[str, str]:
    return {column: title for column, title in columns.items() if picked(COLUMN_STAGES[column])}


def _not_selected(sections: list[str], title: str, *stages: str) -> list[Path]:
    """The section of figures no selected stage gives, said as such (no figure written)."""
    sections.append(f"## {title}\n\nNot in this report: it needs the {' and '.join(stages)} stage, which --stage leaves out.")
    return []


def _rows(plan: Plan, table: pd.DataFrame, baseline: Baseline, columns: dict[str, str], cells: Sequence[CellConfig],
          skip: Callable[[CellConfig, str], bool] = lambda cell, column: False) -> pd.DataFrame:
    rows = []
    for cell in cells:
        row: dict[str, Any] = {"encoder": family_of(cell), "ES": cell.embedding_size, "BS": cell.batch_size or "eval", "cell": cell.cell_id}
        for column, title in columns.items():
            if skip(cell, column):
                row[title] = "n/a (evaluation only)"
                continue
            base = _values(table, baseline.cell_id, column) if baseline.cell_id else None
            row[title], relative = _figure(_values(table, cell.cell_id, column), base)
            if baseline.cell_id:
                row[f"{title} rel."] = relative
        rows.append(row)
    return pd.DataFrame(rows)


def _sorted_cells(plan: Plan, trained: bool = True) -> list[CellConfig]:
    cells = [c for c in plan.cells if c.evaluate_only != trained]
    return sorted(cells, key=lambda c: (family_of(c), c.embedding_size, c.batch_size or 0))


def efficiency_table(plan: Plan, table: pd.DataFrame, baseline: Baseline, picked: StagePicked = _every_stage) -> str:
    columns = _picked_columns({c: title for c, (_, title) in TIMINGS.items()} | {"ita_sd_ms": "ITA SD (ms)"}, picked)
    rows = _rows(plan, table, baseline, columns, _sorted_cells(plan), lambda cell, column: column == "ttt_s" and cell.evaluate_only)
    return "## Table 2: efficiency\n\nMedian over repeats (n, max - min spread); relative: the ratio to the baseline's median.\n\n" + markdown(rows)


def _not_selected_table(title: str, stages: str) -> str:
    return f"{title}\n\nNot in this report: its figures come from the {stages} stage, which --stage leaves out."


def retrieval_table(plan: Plan, table: pd.DataFrame, baseline: Baseline, picked: StagePicked = _every_stage) -> str:
    if not picked("infer"):
        return _not_selected_table("## Table 3: retrieval", "infer")
    rows = _rows(plan, table, baseline, RETRIEVAL, _sorted_cells(plan))
    return "## Table 3: retrieval\n\n" + markdown(rows)


def evaluation_only_table(plan: Plan, table: pd.DataFrame, baseline: Baseline, picked: StagePicked = _every_stage) -> str:
    """The paper's Table 4 (Original DPR against our BERT): every evaluation-only cell with the
    trained cells of the same embedding size."""
    if not picked("infer"):
        return _not_selected_table("## Table 4: evaluation-only models", "infer")
    evaluated = _sorted_cells(plan, trained=False)
    if not evaluated:
        return "## Table 4: evaluation-only models\n\nThe grid has no evaluation-only cell."
    sizes = {c.embedding_size for c in evaluated}
    cells = evaluated + [c for c in _sorted_cells(plan) if c.embedding_size in sizes]
    rows = _rows(plan, table, baseline, RETRIEVAL, cells)
    rows.insert(0, "model", ["evaluated as given: " + plan.cell(c).encoder_label if plan.cell(c).evaluate_only else "trained here" for c in rows["cell"]])
    return "## Table 4: evaluation-only models against trained cells of the same size\n\n" + markdown(rows)


def corpus_table(plan: Plan, table: pd.DataFrame, picked: StagePicked = _every_stage) -> str:
    """Retrieval over each cell's corpus (issue 24): DPR's answer-matching top-k accuracy over
    every passage of the corpus, merged from its shards, and MRR@100 against gold passages
    where the questions file names them; beside the dev pool's Acc@k of Table 3."""
    title = "## Retrieval over the corpus"
    if not picked("merge"):
        return _not_selected_table(title, "merge")
    rows = []
    for cell in _sorted_cells(plan) + _sorted_cells(plan, trained=False):
        if cell.corpus is None:
            continue
        figures = table[table["cell_id"] == cell.cell_id].head(1)
        row: dict[str, Any] = {"encoder": family_of(cell), "ES": cell.embedding_size, "BS": cell.batch_size or "eval", "cell": cell.cell_id,
                               "corpus": cell.corpus.label, "shards": cell.corpus.shards, "vectors": cell.corpus.vectors,
                               "index": cell.corpus.index}
        for column, label in (("corpus_acc@1", "Acc@1"), ("corpus_acc@5", "Acc@5"), ("corpus_acc@20", "Acc@20"),
                              ("corpus_acc@100", "Acc@100"), ("corpus_mrr@100", "MRR@100 (gold)")):
            value = figures[column].iloc[0] if len(figures) and column in figures else None
            row[label] = MISSING if value is None or pd.isna(value) else f"{value:.3f}"
        rows.append(row)
    return (f"{title}\n\nTop-k accuracy as DPR scores it over all of a corpus (a passage among the top k contains an answer, "
            "DPR's has_answer on the passage text), each question's top k merged over the shards by score; MRR@100 against "
            "the gold passages the questions file names (missing where it names none).\n\n" + markdown(pd.DataFrame(rows)))


def batch_size_table(plan: Plan, table: pd.DataFrame, picked: StagePicked = _every_stage) -> str:
    """The paper's Table 5: encoders x sizes trained at more than one batch size."""
    by_shape: dict[tuple[str, int], list[CellConfig]] = {}
    for cell in _sorted_cells(plan):
        by_shape.setdefault((family_of(cell), cell.embedding_size), []).append(cell)
    cells = [c for group in by_shape.values() if len({c.batch_size for c in group}) > 1 for c in group]
    if not cells:
        return "## Table 5: batch size\n\nNo encoder and embedding size is trained at more than one batch size in this grid."
    no_baseline = Baseline("", 0, None)
    rows = _rows(plan, table, no_baseline, _picked_columns({c: t for c, (_, t) in TIMINGS.items()} | RETRIEVAL, picked), cells)
    return "## Table 5: batch size\n\n" + markdown(rows)


# --- The paper's published figures beside ours (--paper) -------------------------------------

PAPER_EFFICIENCY = {"ttt_s": "TTT (h:mm)", "pei_s": "PEI (h:mm)", "ita_mean_ms": "ITA (ms)"}
PAPER_RETRIEVAL = {"acc@1": "Acc@1 (%)", "acc@20": "Acc@20 (%)", "acc@100": "Acc@100 (%)", "mrr@100": "MRR@100"}
NOT_IN_PAPER = "not in the paper"


def beside_the_paper(plan: Plan, table: pd.DataFrame, picked: StagePicked = _every_stage) -> list[str]:
    """Two tables, efficiency and retrieval: per cell and figure, the paper's (with its table),
    ours (the median over repeats) and ours / the paper's, in the paper's units."""
    intro = ("The paper's figure (the table that prints it), ours (median over repeats) and ours / the paper's. "
             "Timings compare like for like only where the grid ran the paper's timing protocol on comparable hardware "
             "(the README's Fidelity table). A cell the paper does not have says so.")
    cells = _sorted_cells(plan) + _sorted_cells(plan, trained=False)
    efficiency = _picked_columns(PAPER_EFFICIENCY, picked)
    retrieval = _picked_columns(PAPER_RETRIEVAL, picked)
    sections = [f"## Beside the paper: efficiency (Tables 2 and 5)\n\n{intro}\n\n" + markdown(_paper_rows(plan, table, efficiency, cells))]
    sections.append("## Beside the paper: retrieval (Tables 3, 4 and 5)\n\n" + markdown(_paper_rows(plan, table, retrieval, cells))
                    if retrieval else _not_selected_table("## Beside the paper: retrieval (Tables 3, 4 and 5)", "infer"))
    return sections


def _paper_rows(plan: Plan, table: pd.DataFrame, columns: dict[str, str], cells: Sequence[CellConfig]) -> pd.DataFrame:
    from dpr_hpc.reporting.published import paper_cell, paper_figures

    rows = []
    for cell in cells:
        key = paper_cell(family_of(cell), cell.embedding_size, cell.batch_size, cell.question_encoder, cell.evaluate_only)
        published = paper_figures()[key] if key else {}
        row: dict[str, Any] = {"encoder": key[0] if key else family_of(cell), "ES": cell.embedding_size, "BS": cell.batch_size or "eval", "cell": cell.cell_id}
        for column, title in columns.items():
            values = _values(table, cell.cell_id, column)
            ours = float(np.median(values)) if values else None
            figure = published.get(column)
            if figure is None:
                row[f"{title} paper"] = NOT_IN_PAPER
            else:
                row[f"{title} paper"] = f"{figure.printed} (T{'/'.join(map(str, figure.tables))})"
            row[f"{title} ours"] = MISSING if ours is None else _in_paper_units(column, ours)
            row[f"{title} ours/paper"] = f"{ours / figure.value:.3g}x" if figure and ours is not None and figure.value else ""
        rows.append(row)
    return pd.DataFrame(rows)


def _in_paper_units(column: str, value: float) -> str:
    """A figure as the paper prints it: hours as h:mm, accuracies in percent, MRR as .xyz."""
    if column in ("ttt_s", "pei_s"):
        hours, minutes = divmod(round(value / 60), 60)
        return f"{hours}:{minutes:02d}" + (f" ({value:.3g} s)" if value < 60 else "")
    if column.startswith("acc@"):
        return f"{100 * value:.1f}"
    if column == "mrr@100":
        return f"{value:.3f}".lstrip("0") or "0"
    return f"{value:.3g}"


# --- Figures 1-5 ---------------------------------------------------------------------------

def _metric_figures(plan: Plan, table: pd.DataFrame, baseline: Baseline, out_dir: Path, sections: list[str],
                    picked: StagePicked = _every_stage) -> list[Path]:
    written = []
    specs = [("ttt_s", "Figure 2: total training time", "TTT"), ("pei_s", "Figure 3: passage encoding + indexing time", "PEI"),
             ("ita_mean_ms", "Figure 4: inference time average", "ITA"), ("mrr@100", "Figure 5: MRR@100", "MRR@100")]
    for column, title, short in specs:
        if not picked(COLUMN_STAGES[column]):
            _not_selected(sections, title, COLUMN_STAGES[column])
            continue
        base = _values(table, baseline.cell_id, column) if baseline.cell_id else []
        scale = float(np.median(base)) if base else None
        series = metric_series(plan, table, column, scale)
        name = f"figure-{short.lower().replace('@', '')}.png"
        if not series:
            sections.append(f"## {title}\n\nNo cell has this figure yet ({MISSING}).")
            continue
        unit = {"ttt_s": "s", "pei_s": "s", "ita_mean_ms": "ms", "mrr@100": ""}[column]
        ylabel = f"{short} / {baseline.label}" if scale else f"{short}{f' ({unit})' if unit else ''}"
        written.append(figures.metric_vs_size(series, out_dir / name, title, ylabel, baseline.label if scale else None))
        sections.append(f"## {title}\n\n![{title}]({name})")
    return written


def metric_series(plan: Plan, table: pd.DataFrame, column: str, scale: float | None) -> list[figures.Series]:
    """One line per family (per family and batch size where a family has several), each cell a
    point at its size with every repeat's value, divided by `scale` where there is one."""
    cells = _sorted_cells(plan)
    batch_sizes: dict[str, set] = {}
    for cell in cells:
        batch_sizes.setdefault(family_of(cell), set()).add(cell.batch_size)
    lines: dict[str, dict[int, list[float]]] = {}
    for cell in cells:
        values = _values(table, cell.cell_id, column)
        if not values:
            continue
        family = family_of(cell)
        label = family if len(batch_sizes[family]) == 1 else f"{family} (batch {cell.batch_size})"
        lines.setdefault(label, {}).setdefault(cell.embedding_size, []).extend(v / scale if scale else v for v in values)
    return [figures.Series(label, sorted(points), [points[s] for s in sorted(points)]) for label, points in lines.items()]


TOKEN_LENGTH_TITLE = "Figure 1: passage token lengths of the dev pool"


def _token_length_figure(layout: RunLayout, plan: Plan, found: CompleteRecords, out_dir: Path, sections: list[str]) -> list[Path]:
    """Figure 1 from the token cache entries the index stages recorded: no tokenizing. The
    cache keeps sequences cut at max_length, so a passage at the cut-off may or may not have
    been longer: the share at the cut-off is an upper bound of the share truncated."""
    entries: dict[str, Path] = {}
    max_lengths = set()
    for repeat in found.repeats:
        entry = (repeat.index or {}).get("details", {}).get("token_cache_entry")
        if entry:
            cell = plan.cell(repeat.cell_id)
            entries.setdefault(family_of(cell), layout.store.token_cache / entry)
            max_lengths.add(cell.text.max_length)
    title = TOKEN_LENGTH_TITLE
    if not entries:
        sections.append(f"## {title}\n\n{MISSING}: no complete index record names its token cache entry (records from before this report existed).")
        return []
    from dpr_hpc.modeling.batching import TokenizedTexts

    lengths, unreadable = {}, []
    for family, path in entries.items():
        try:
            lengths[family] = TokenizedTexts.load(path).lengths
        except (OSError, ValueError, KeyError) as exc:
            unreadable.append(f"{path} ({exc})")
    if not lengths:
        sections.append(f"## {title}\n\n{MISSING}: the token cache entries cannot be read: {'; '.join(unreadable)}")
        return []
    lengths = _merge_identical(lengths)
    max_length = max(max_lengths)
    shares = {family: float((values >= max_length).mean()) for family, values in lengths.items()}
    share_text = ", ".join(f"{family} {share:.1%}" for family, share in shares.items())
    note = (f"At the cut-off ({max_length}): {share_text}. The token cache stores sequences already truncated to max_length, "
            "so these are upper bounds of the share truncated and lengths beyond the cut-off are not known.")
    path = figures.token_lengths(lengths, max_length, out_dir / "figure-token-lengths.png", title)
    sections.append(f"## {title}\n\n![{title}](figure-token-lengths.png)\n\n{note}"
                    + (f"\n\nUnreadable entries: {'; '.join(unreadable)}" if unreadable else ""))
    return [path]


def _merge_identical(lengths: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Tokenizers that give the same lengths share one line ('BERT = DistilBERT'), which would
    otherwise be drawn on top of each other with only the last visible."""
    merged: dict[str, np.ndarray] = {}
    for family, values in lengths.items():
        same = next((label for label, other in merged.items() if np.array_equal(other, values)), None)
        if same is None:
            merged[family] = values
        else:
            merged[f"{same} = {family}"] = merged.pop(same)
    return merged


# --- Hardware variance ------------------------------------------------------------------------

VARIANCE_METRICS = {"ttt_s": ("train", "ttt_s"), "pei_s": ("index", "pei_s"), "ita_mean_ms": ("infer", "ita_mean_ms")}


def hardware_of(node: dict[str, Any]) -> str:
    return str(node.get("gpu_name") or node.get("cpu_model") or "?")


def variance_rows(repeats: Sequence[RepeatRecords], factor: float) -> pd.DataFrame:
    """Every timing repeat with its node and hardware, its cell's median and the ratio to it;
    flagged when the ratio is beyond `factor` either way. A training counts once per cell."""
    rows = []
    for repeat in repeats:
        for metric, (stage, key) in VARIANCE_METRICS.items():
            record = getattr(repeat, stage)
            if not record or (stage == "train" and repeat.repeat > 0):
                continue
            rows.append({"cell_id": repeat.cell_id, "metric": metric, "repeat": repeat.repeat, "node": node_label(record["node"]),
                         "hardware": hardware_of(record["node"]), "value": float(record["timings"][key])})
    table = pd.DataFrame(rows, columns=["cell_id", "metric", "repeat", "node", "hardware", "value"])
    if table.empty:
        return table.assign(cell_median=[], ratio=[], flagged=[])
    table["cell_median"] = table.groupby(["cell_id", "metric"])["value"].transform("median")
    table["ratio"] = table["value"] / table["cell_median"]
    table["flagged"] = (table["ratio"] > factor) | (table["ratio"] < 1.0 / factor)
    return table


def node_summary(variance: pd.DataFrame) -> pd.DataFrame:
    grouped = variance.groupby(["node", "hardware", "metric"], sort=True)
    return grouped.agg(repeats=("value", "size"), median_ratio=("ratio", "median"), flagged=("flagged", "sum")).reset_index()


def node_points(variance: pd.DataFrame) -> list[figures.NodePoints]:
    points = []
    for (node, hardware), group in variance.groupby(["node", "hardware"], sort=True):
        points.append(figures.NodePoints(f"{node}\n{hardware[:28]}", {m: g["ratio"].tolist() for m, g in group.groupby("metric")}))
    return points


def variance_section(variance: pd.DataFrame, factor: float) -> str:
    head = (f"## Hardware variance\n\nEvery timing repeat by node and hardware, as a ratio to its cell's median; "
            f"a repeat is flagged beyond {factor:g}x either way. Only cells with several repeats can flag one.")
    if variance.empty:
        return head + f"\n\n{MISSING}: no complete timing record yet."
    flagged = variance[variance["flagged"]]
    parts = [head, "Per node (median ratio to the cell medians):", markdown(node_summary(variance))]
    if len(flagged):
        parts += [f"Flagged repeats ({len(flagged)}):", markdown(flagged[["cell_id", "metric", "repeat", "node", "hardware", "value", "cell_median", "ratio"]])]
    else:
        parts.append("No repeat is flagged.")
    return "\n\n".join(parts)


# --- Cost -------------------------------------------------------------------------------------

def cost_section(cost: CostTable) -> str:
    def shown(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.astype(object).where(frame.notna(), "n/a")

    total = pd.DataFrame([cost.grid])
    return "\n\n".join([
        "## Cost",
        f"Per stage job; wall time, queue wait (start - submit) and peak RSS from the scheduler's accounting where there is one, "
        f"else from the records (each row's `source` says which). Accounting: {cost.sacct_note}. "
        "GPU-hours where the job had a GPU, else CPU-hours (wall time x CPUs allotted); cpu_time_s is the CPU time used (sacct's TotalCPU). Peak GPU memory is the record's (torch's "
        "max allocated) against the GPU's memory; requested memory is SLURM's allocation. "
        "n/a: no source measured it (a local job has no queue and no request; a CPU job no GPU).",
        markdown(shown(cost.jobs)),
        "Per cell (a job shared by several cells counts in each):",
        markdown(shown(cost.cells)),
        "Grid (every job once):",
        markdown(shown(total)),
    ])


# --- HTML -------------------------------------------------------------------------------------

def write_html(report_md: Path, out: Path) -> Path:
    """report.md as one HTML file with its figures inline (base64), readable offline and
    mailable; a small Markdown subset (headings, tables, images, paragraphs) is all it uses."""
    body = []
    for block in report_md.read_text().split("\n\n"):
        body.append(_html_block(block.strip(), report_md.parent))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>dpr-hpc report</title><style>"
            "body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    out.write_text(page)
    return out


def _html_block(block: str, folder: Path) -> str:
    if block.startswith("#"):
        level = len(block) - len(block.lstrip("#"))
        return f"<h{level}>{html.escape(block[level:].strip())}</h{level}>"
    image = re.fullmatch(r"!\[(.*?)\]\((.*?)\)", block)
    if image:
        data = base64.b64encode((folder / image.group(2)).read_bytes()).decode()
        return f"<img alt='{html.escape(image.group(1))}' src='data:image/png;base64,{data}'>"
    if block.startswith("|"):
        rows = [_split_row(line) for line in block.splitlines() if not re.fullmatch(r"\|(---\|)+", line)]
        head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
        cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
        return f"<table><tr>{head}</tr>{cells}</table>"
    return f"<p>{html.escape(block)}</p>"


def _split_row(line: str) -> list[str]:
    """A Markdown row's cells, honouring escaped pipes (`\\|`)."""
    cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
    return [c.strip().replace("\\|", "|") for c in cells]
