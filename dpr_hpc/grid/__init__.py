"""Grid spec: the YAML file a researcher writes, validated once into typed cells."""

from dpr_hpc.grid.config import STAGES, CellConfig, IndexConfig, Repeats, TextConfig, TimingConfig, TrainConfig
from dpr_hpc.grid.loader import Grid, load_grid

__all__ = ["STAGES", "CellConfig", "Grid", "IndexConfig", "Repeats", "TextConfig", "TimingConfig", "TrainConfig", "load_grid"]
