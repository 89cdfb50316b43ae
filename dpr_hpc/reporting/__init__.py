"""From records to figures: the merged table, the notebook frame, the report, its figures and cost,
and the paper's published figures beside ours."""
