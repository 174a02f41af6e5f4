"""String columns as dataframe libraries write them: plain, large, view and dictionary-encoded (categorical)
text reads as the same jobs as a plain-string manifest. Each writer's test is skipped when that library is
not installed (they are in the `test` extra)."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_image
from pipeline.config import load_config
from pipeline.errors import ManifestError
from pipeline.manifest import read_manifest
from pipeline.stages.image import check_image

ROWS = [
    {"job_id": "a-1", "prompt": "a red circle moving left on a blue background", "seed": 1,
     "negative_prompt": "blurry"},
    {"job_id": "a-2", "prompt": "a red circle moving left on a blue background", "seed": 2,
     "negative_prompt": "blurry"},
    {"job_id": "b-3", "prompt": "a green square moving right on a black background", "seed": 3,
     "negative_prompt": None},
]


def jobs_of(path: Path) -> list[tuple]:
    jobs = read_manifest(path, load_config(), check_image=check_image)
    assert not [j.error for j in jobs if j.error]
    return [(j.row, j.job_id, j.prompt, j.negative_prompt, j.image, j.seed) for j in jobs]


@pytest.fixture
def plain(tmp_path) -> list[tuple]:
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    return jobs_of(path)


def _column_types(path: Path) -> dict[str, pa.DataType]:
    schema = pq.read_schema(path)
    return {name: schema.field(name).type for name in schema.names}


def test_pyarrow_dictionary_encoded(tmp_path, plain):
    table = pa.Table.from_pylist(ROWS)
    for name in ("job_id", "prompt", "negative_prompt"):
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, table[name].dictionary_encode())
    path = tmp_path / "dict.parquet"
    pq.write_table(table, path)
    assert pa.types.is_dictionary(_column_types(path)["prompt"])
    assert jobs_of(path) == plain


@pytest.mark.parametrize("kind", ["large_string", "string_view", "dictionary<large_string>"])
def test_other_arrow_string_types(tmp_path, plain, kind):
    value_type = {"large_string": pa.large_string(), "string_view": pa.string_view(),
                  "dictionary<large_string>": pa.dictionary(pa.uint32(), pa.large_string())}[kind]
    table = pa.Table.from_pylist(ROWS)
    table = table.set_column(table.schema.get_field_index("prompt"), pa.field("prompt", value_type),
                             table["prompt"].cast(value_type))
    path = tmp_path / "m.parquet"
    pq.write_table(table, path)
    assert jobs_of(path) == plain


def test_pandas_category(tmp_path, plain):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(ROWS)
    for name in ("job_id", "prompt", "negative_prompt"):
        df[name] = df[name].astype("category")
    path = tmp_path / "pandas.parquet"
    df.to_parquet(path)
    assert pa.types.is_dictionary(_column_types(path)["prompt"])
    assert jobs_of(path) == plain


def test_polars_categorical(tmp_path, plain):
    pl = pytest.importorskip("polars")
    df = pl.DataFrame(ROWS).with_columns(pl.col("prompt").cast(pl.Categorical),
                                         pl.col("job_id").cast(pl.Categorical))
    path = tmp_path / "polars.parquet"
    df.write_parquet(path)
    assert pa.types.is_dictionary(_column_types(path)["prompt"])
    assert jobs_of(path) == plain


def test_duckdb_enum_and_varchar(tmp_path, plain):
    duckdb = pytest.importorskip("duckdb")
    path = tmp_path / "duckdb.parquet"
    con = duckdb.connect()
    con.execute("CREATE TYPE prompts AS ENUM ('a red circle moving left on a blue background', "
                "'a green square moving right on a black background')")
    con.execute("CREATE TABLE m (job_id VARCHAR, prompt prompts, seed BIGINT, negative_prompt VARCHAR)")
    con.executemany("INSERT INTO m VALUES (?, ?, ?, ?)",
                    [(r["job_id"], r["prompt"], r["seed"], r["negative_prompt"]) for r in ROWS])
    con.execute(f"COPY (SELECT * FROM m ORDER BY job_id) TO '{path}' (FORMAT PARQUET)")
    assert jobs_of(path) == plain


def test_dictionary_image_column_is_resolved_like_a_string(tmp_path):
    make_image(tmp_path / "first.png")
    table = pa.table({"prompt": pa.array(["x", "y"]).dictionary_encode(),
                      "image": pa.array(["first.png", "first.png"]).dictionary_encode()})
    pq.write_table(table, tmp_path / "m.parquet")
    jobs = read_manifest(tmp_path / "m.parquet", load_config(), check_image=check_image)
    assert [j.image for j in jobs] == [str((tmp_path / "first.png").resolve())] * 2
    assert [j.task for j in jobs] == ["i2v", "i2v"]


def test_dictionary_of_numbers_in_a_string_column_is_refused(tmp_path):
    table = pa.table({"prompt": pa.array([1, 2, 1]).dictionary_encode()})
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"column 'prompt' must hold strings, not int64"):
        read_manifest(tmp_path / "m.parquet", load_config())
