"""Grid -> plan: stage jobs, their keys, and the selection of cells, groups and stages."""
