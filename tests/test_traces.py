"""Trace import: the canonical CSV, the philly/tiresias importers, windows, load scaling,
malformed rows, and ``ganglion trace import``."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from ganglion import traces
from ganglion.cli import main
from ganglion.traces import TraceError, TraceFormatError, Window
from tests.conftest import SHARED_TRACES

PHILLY = SHARED_TRACES / "philly" / "philly.csv"
SIXTY = SHARED_TRACES / "tiresias" / "60_job.csv"

PHILLY_ROWS = """timestamp,duration,num_gpus,gpu_time,cluster
2017-10-02 00:00:10,100.0,1,100.0,vcA
2017-10-01 00:00:00,50.0,2,100.0,vcB
2017-10-03 12:00:00,7.5,8,60.0,vcA
"""

TIRESIAS_ROWS = """job_id,num_gpu,submit_time,iterations,model_name,duration,interval
0,1,0,606,vgg19,164,30
1,8,30,133,vgg11,147,23
2,2,10,157,inception4,127,26
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared trace {path} not found (set GANGLION_TRACES or add ../shared)")
    return path


def test_philly_rows_are_sorted_rebased_and_keep_their_cluster_as_tenant(tmp_path: Path) -> None:
    t = traces.load(write(tmp_path, "p.csv", PHILLY_ROWS), "philly")
    assert t.job_id == ("philly-2", "philly-1", "philly-3")  # data row numbers, submit order
    assert t.submit_s.tolist() == [0.0, 86410.0, 2 * 86400 + 12 * 3600]
    assert t.duration_s.tolist() == [50.0, 100.0, 7.5]
    assert t.num_gpus.tolist() == [2, 1, 8]
    assert t.tenant == ("vcB", "vcA", "vcA")
    assert t.origin == datetime(2017, 10, 1)


def test_tiresias_rows_and_auto_detection(tmp_path: Path) -> None:
    t = traces.load(write(tmp_path, "t.csv", TIRESIAS_ROWS))  # auto
    assert t.job_id == ("j0", "j2", "j1")
    assert t.submit_s.tolist() == [0.0, 10.0, 30.0]
    assert t.num_gpus.tolist() == [1, 2, 8]
    assert set(t.tenant) == {traces.DEFAULT_TENANT}
    assert t.origin is None


def test_canonical_csv_round_trips_with_its_origin(tmp_path: Path) -> None:
    src = traces.load(write(tmp_path, "p.csv", PHILLY_ROWS))
    out = tmp_path / "canon.csv"
    src.write_csv(out)
    assert out.read_text().splitlines()[:2] == [
        "# origin=2017-10-01T00:00:00",
        "job_id,submit_s,duration_s,num_gpus,tenant,priority",
    ]
    back = traces.load(out, "csv")
    assert back.job_id == src.job_id
    assert np.array_equal(back.submit_s, src.submit_s)
    assert np.array_equal(back.duration_s, src.duration_s)
    assert np.array_equal(back.num_gpus, src.num_gpus)
    assert back.tenant == src.tenant
    assert back.origin == src.origin


def test_canonical_csv_allows_extra_columns_and_priority(tmp_path: Path) -> None:
    text = "job_id,submit_s,duration_s,num_gpus,tenant,gpu_type,priority\na,5,10,1,t1,V100,3\n"
    t = traces.load(write(tmp_path, "c.csv", text))
    assert t.job_id == ("a",) and t.priority.tolist() == [3] and t.tenant == ("t1",)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ("2017-10-02 00:00:10,abc,1,100.0,vcA", "could not convert"),
        ("2017-10-02 00:00:10,10,0,100.0,vcA", "GPUs must be at least 1"),
        ("2017-10-02 00:00:10,-5,1,100.0,vcA", "duration must be finite and >= 0"),
        ("not a date,10,1,10,vcA", "Invalid isoformat"),
        ("2017-10-02 00:00:10,10,1", "3 fields, header has 5"),
    ],
)
def test_a_malformed_row_names_file_and_line(tmp_path: Path, row: str, problem: str) -> None:
    path = write(tmp_path, "bad.csv", PHILLY_ROWS + row + "\n")
    with pytest.raises(TraceFormatError) as err:
        traces.load(path)
    assert err.value.line == 5 and err.value.path == str(path)
    assert str(err.value).startswith(f"{path}:5: bad row (")
    assert problem in str(err.value)


def test_skip_bad_counts_the_rows_it_left_out(tmp_path: Path) -> None:
    text = PHILLY_ROWS + "x,1,1,1,vc\n" + "2017-10-05 00:00:00,1,1,1,vcC\n" + ",,,,\n"
    t = traces.load(write(tmp_path, "bad.csv", text), skip_bad=True)
    assert len(t) == 4 and t.skipped == 2


def test_duplicate_ids_and_unknown_headers_are_errors(tmp_path: Path) -> None:
    dup = "job_id,submit_s,duration_s,num_gpus,tenant\na,0,1,1,t\na,1,1,1,t\n"
    with pytest.raises(TraceFormatError, match=r"dup\.csv:3: .*duplicate job id 'a'"):
        traces.load(write(tmp_path, "dup.csv", dup))
    with pytest.raises(TraceFormatError, match=r"odd\.csv:1: unknown trace format"):
        traces.load(write(tmp_path, "odd.csv", "a,b\n1,2\n"))
    with pytest.raises(TraceFormatError, match="missing column"):
        traces.load(write(tmp_path, "t.csv", TIRESIAS_ROWS), "philly")


def test_windows_in_days_and_dates_rebase_to_the_window_start(tmp_path: Path) -> None:
    t = traces.load(write(tmp_path, "p.csv", PHILLY_ROWS))
    days = t.window(Window.parse("1:2"))
    assert days.job_id == ("philly-1",) and days.submit_s.tolist() == [10.0]
    assert t.window(Window.parse("1:3")).job_id == ("philly-1", "philly-3")
    assert days.origin == datetime(2017, 10, 2)
    dates = t.window(Window.parse("2017-10-02:2017-10-04"))
    assert dates.job_id == ("philly-1", "philly-3")
    assert dates.submit_s.tolist() == [10.0, 86400 + 12 * 3600]
    precise = t.window(Window.parse("2017-10-03T11:00..2017-10-03T13:00"))
    assert precise.job_id == ("philly-3",) and precise.submit_s.tolist() == [3600.0]


@pytest.mark.parametrize("text", ["3", "5:2", "a:b", "1:2017-10-01", "1:2:3", "-3:2", "-1..-0.5"])
def test_bad_windows_say_what_is_wrong(text: str) -> None:
    with pytest.raises(ValueError, match="window"):
        Window.parse(text)


def test_a_date_window_needs_an_origin(tmp_path: Path) -> None:
    t = traces.load(write(tmp_path, "t.csv", TIRESIAS_ROWS))
    with pytest.raises(TraceError, match="no origin"):
        t.window(Window.parse("2017-10-01:2017-10-02"))


def test_load_scale_compresses_arrivals_only(tmp_path: Path) -> None:
    t = traces.load(write(tmp_path, "t.csv", TIRESIAS_ROWS))
    faster = t.scale_load(2.0)
    assert faster.submit_s.tolist() == [0.0, 5.0, 15.0]
    assert np.array_equal(faster.duration_s, t.duration_s)
    with pytest.raises(ValueError, match="positive"):
        t.scale_load(0.0)


def test_the_shared_philly_trace_imports_whole() -> None:
    t = traces.load(need(PHILLY))
    assert len(t) == 82_247 and t.skipped == 0
    assert t.origin == datetime(2017, 9, 4, 10, 30, 41)
    assert len(set(t.tenant)) == 15
    assert int(t.num_gpus.max()) == 128
    assert bool(np.all(np.diff(t.submit_s) >= 0))


def test_the_shared_60_job_trace_imports() -> None:
    t = traces.load(need(SIXTY))
    assert len(t) == 60 and int(t.num_gpus.sum()) == 170


def test_cli_import_writes_a_canonical_window(tmp_path: Path) -> None:
    out = tmp_path / "w.csv"
    argv = ["trace", "import", "--format", "philly", str(need(PHILLY)), "-o", str(out)]
    argv += ["--window", "2017-10-02:2017-10-03", "--load-scale", "2"]
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    back = traces.load(out)
    direct = traces.prepare(PHILLY, window="2017-10-02:2017-10-03", load_scale=2.0)
    assert back.job_id == direct.job_id and len(back) > 100
    assert np.allclose(back.submit_s, direct.submit_s)
    assert back.origin == datetime(2017, 10, 2)


def test_cli_import_reports_a_malformed_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write(tmp_path, "bad.csv", PHILLY_ROWS + "oops\n")
    with pytest.raises(SystemExit) as done:
        main(["trace", "import", str(src), "-o", str(tmp_path / "o.csv")])
    assert done.value.code == 2
    assert f"{src}:5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["trace", "import", str(src), "-o", str(tmp_path / "o.csv"), "--skip-bad"])
    assert done.value.code == 0
    assert "skipped 1 malformed rows" in capsys.readouterr().err
