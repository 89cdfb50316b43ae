"""Named data sources: what a grid may write instead of a path (`train: dpr:nq-train`), where
each one comes from and where it lives on this machine.

A name enters the cell id as written, so a grid that names DPR's files gives the same ids on
every machine, wherever the files lie. `dpr-hpc prefetch` downloads them
(dpr_hpc.inputs.sources); this module only knows the catalog and the local paths, so the grid
layer can turn a name into a path without any download machinery.

The built-in names are DPR's own files (facebookresearch/DPR, dpr/data/download_data.py,
RESOURCES_MAP). Where a digest of the download is published (ir_datasets' downloads.json
lists an MD5 for the three large ones), it is checked at the first download; every file is
then pinned by its SHA-256 (dpr_hpc.inputs.sources.DataPins).

A site adds its own sources, or a test serves small ones, through a catalog file named by
DPR_HPC_DATA_CATALOG (YAML: `name: {url: ..., file: ..., md5: ...}`, url absolute or relative
to the base URL).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from dpr_hpc.fsutil import user_cache_dir

DATA_DIR_VARIABLE = "DPR_HPC_DATA_DIR"
MIRROR_VARIABLE = "DPR_HPC_DATA_MIRROR"
CATALOG_VARIABLE = "DPR_HPC_DATA_CATALOG"
DPR_BASE_URL = "https://dl.fbaipublicfiles.com/dpr/"
# 'prefix:id'. A path that happens to look like one is written './dpr:x'.
NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*:[A-Za-z0-9][A-Za-z0-9_.-]*")


class SourceError(ValueError):
    """A named source that is unknown, or a catalog file that cannot be read; says which."""


@dataclass(frozen=True)
class Source:
    """One downloadable file. `url` is absolute or relative to the base URL (DPR's, or the
    mirror's); `file` is the plain file the stages read, under the data folder."""

    name: str
    url: str
    file: str
    md5: str | None = None  # a published digest of the download, checked at the first one
    description: str = ""

    @property
    def gzipped(self) -> bool:
        """Served gzip-compressed: verified as downloaded, then decompressed for the stages (the
        biencoder reader parses plain JSON; a corpus shard seeks into the plain TSV)."""
        return self.url.endswith(".gz") and not self.file.endswith(".gz")

    @property
    def download_name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def url_from(self, base: str) -> str:
        if re.match(r"[a-z][a-z0-9+.-]*://", self.url):
            return self.url
        return base.rstrip("/") + "/" + self.url.lstrip("/")


# Digests: ir_datasets/etc/downloads.json, "dpr-w100" (docs, nq-train, nq-dev). DPR publishes none.
CATALOG: dict[str, Source] = {s.name: s for s in (
    Source("dpr:nq-train", "data/retriever/biencoder-nq-train.json.gz", "biencoder-nq-train.json",
           md5="a1c927b5adae71388eb064329387709f", description="DPR's NQ retriever training file (biencoder format)"),
    Source("dpr:nq-dev", "data/retriever/biencoder-nq-dev.json.gz", "biencoder-nq-dev.json",
           md5="2640483dbe0df7ae29c6da419c551a80", description="DPR's NQ retriever dev file (biencoder format)"),
    Source("dpr:psgs_w100", "wikipedia_split/psgs_w100.tsv.gz", "psgs_w100.tsv",
           md5="612fe66e0b6b41ee28f806140226c563", description="DPR's Wikipedia: 21,015,324 passages of 100 words (id, text, title)"),
    Source("dpr:nq-test", "data/retriever/nq-test.qa.csv", "nq-test.qa.csv",
           description="NQ's 3,610 test questions with their answers (tab-separated)"),
)}


def is_name(value: str) -> bool:
    """Whether a grid value names a source rather than a file path."""
    return NAME_PATTERN.fullmatch(value) is not None


def catalog() -> dict[str, Source]:
    """The built-in sources, with those of the DPR_HPC_DATA_CATALOG file added or replacing them."""
    extra = os.environ.get(CATALOG_VARIABLE)
    return {**CATALOG, **(_read_catalog(Path(extra).expanduser()) if extra else {})}


def source(name: str) -> Source:
    known = catalog()
    if name not in known:
        raise SourceError(f"unknown data source {name!r}; expected one of {', '.join(sorted(known))}, or a file path")
    return known[name]


def data_dir() -> Path:
    """Where named sources are kept: DPR_HPC_DATA_DIR, else ~/.cache/dpr-hpc/data (read at each
    call; compute nodes must see the same folder, as they see the Hugging Face cache)."""
    if os.environ.get(DATA_DIR_VARIABLE):
        return Path(os.environ[DATA_DIR_VARIABLE]).expanduser().resolve()
    return (user_cache_dir() / "data").resolve()


def base_url() -> str:
    return os.environ.get(MIRROR_VARIABLE) or DPR_BASE_URL


def local_path(name: str) -> Path:
    """The plain file a named source is kept as: <data dir>/<prefix>/<file>."""
    found = source(name)
    return data_dir() / found.name.split(":", 1)[0] / found.file


def _read_catalog(path: Path) -> dict[str, Source]:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SourceError(f"{path} ({CATALOG_VARIABLE}): cannot be read: {exc}") from None
    if not isinstance(raw, dict):
        raise SourceError(f"{path} ({CATALOG_VARIABLE}): expected a mapping of source name to {{url, file, md5}}")
    sources = {}
    for name, entry in raw.items():
        if not (isinstance(name, str) and is_name(name)):
            raise SourceError(f"{path}: {name!r}: expected a name like 'site:my-file' (prefix, colon, id)")
        if not (isinstance(entry, dict) and isinstance(entry.get("url"), str) and set(entry) <= {"url", "file", "md5", "description"}):
            raise SourceError(f"{path}: {name}: expected a mapping with 'url' and optionally 'file', 'md5', 'description'")
        url = entry["url"]
        default_file = url.rsplit("/", 1)[-1][: -len(".gz")] if url.endswith(".gz") else url.rsplit("/", 1)[-1]
        file = entry.get("file", default_file)
        if not (isinstance(file, str) and file and "/" not in file):
            raise SourceError(f"{path}: {name}.file: expected a file name (no folder), got {file!r}")
        sources[name] = Source(name, url, file, entry.get("md5"), entry.get("description", ""))
    return sources
