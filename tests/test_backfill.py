"""What FROM and TO of a backfill mean: the first and the last *processed* day (inclusive), in the road's time
zone, whatever `schedule.process_date` — checked through Airflow's own `airflow backfill create --dry-run`
against a real (SQLite) Airflow home, for a Seoul road and a Los Angeles road; and `make backfill`'s
checks and its `LOCAL=1` preview without a cluster.

Airflow's rule: a backfill creates one run per logical date in [--from-date, --to-date] whose data interval
has ended; a bare date is 00:00 UTC. The DAGs make a run's logical date the processed day at the cron time
in the road's zone, so `backfill_bounds` turns FROM/TO into 00:00:00 / 23:59:59 of those days in that zone.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import zoneinfo
from pathlib import Path

import pytest
from conftest import make
from dagtest import write_roads

from answersheet.dev.local_airflow import backfill_args, backfill_bounds, prepare_airflow_home, run_airflow
from answersheet.errors import AnswersheetError

# A past week (the backfill refuses future days, and a previous_run day runs only once the next weekday's
# 09:00 has passed): Monday three weeks before today.
_today = dt.date.today()
MONDAY = _today - dt.timedelta(days=_today.weekday() + 21)
WEEK = [MONDAY + dt.timedelta(days=i) for i in range(7)]  # Mon .. Sun
WEEKDAYS = [d.isoformat() for d in WEEK[:5]]
RUN_ROW = re.compile(r"\|\s*(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\+00:00)\s*\|")


@pytest.fixture(scope="module")
def roads(tmp_path_factory) -> Path:
    start = (MONDAY - dt.timedelta(days=28)).isoformat()
    return write_roads(tmp_path_factory.mktemp("roads") / "roads.yaml", [
        {"id": "seoul", "schedule": {"start_date": start}},
        {"id": "seoul_run_day", "schedule": {"start_date": start, "process_date": "run_day"}},
        {"id": "la", "schedule": {"timezone": "America/Los_Angeles", "start_date": start}},
        {"id": "la_run_day", "schedule": {"timezone": "America/Los_Angeles", "start_date": start,
                                          "process_date": "run_day", "max_active_runs": 3}},
    ])


@pytest.fixture(scope="module")
def home(tmp_path_factory, roads):
    """A migrated local Airflow home with the roads' DAGs serialized into its database (once)."""
    home = tmp_path_factory.mktemp("airflow-home")
    code, tail = run_airflow(["dags", "reserialize"], prepare(home, roads), home / "reserialize.log")
    assert code == 0, "\n".join(tail)
    return home


def prepare(home: Path, roads: Path) -> dict[str, str]:
    return prepare_airflow_home(home, roads, dict(os.environ))


def processed_days(output: str, zone: str) -> list[str]:
    """The days the runs listed by `airflow backfill create --dry-run` process (logical date in the zone)."""
    stamps = RUN_ROW.findall(output.rsplit("$ airflow backfill", 1)[-1])
    return [dt.datetime.fromisoformat(s).astimezone(zoneinfo.ZoneInfo(zone)).date().isoformat() for s in stamps]


def dry_run(home: Path, roads: Path, road: str, first: str, last: str) -> str:
    """`airflow backfill create --dry-run` with the bounds `make backfill` passes; its output."""
    log = home / "backfill.log"
    args = backfill_args(roads, road, first, last, dry_run=True)
    code, tail = run_airflow(args, prepare(home, roads), log)
    assert code == 0, "\n".join(tail)
    return log.read_text(encoding="utf-8")


def test_bounds_are_the_days_in_the_road_zone(roads):
    assert backfill_bounds(roads, "seoul", "2026-11-02", "2026-11-06") == (
        "2026-11-02T00:00:00+09:00", "2026-11-06T23:59:59+09:00")
    assert backfill_bounds(roads, "la", "2026-10-26", "2026-11-06") == (  # DST ends on 2026-11-01
        "2026-10-26T00:00:00-07:00", "2026-11-06T23:59:59-08:00")


def test_a_backfill_runs_as_many_days_at_once_as_the_road_allows(roads):
    """Airflow's backfills default to 10 concurrent runs whatever the DAG's max_active_runs."""
    for road, runs in (("seoul", "1"), ("la_run_day", "3")):
        args = backfill_args(roads, road, "2026-11-02", "2026-11-06")
        assert args[args.index("--max-active-runs") + 1] == runs


@pytest.mark.parametrize(("road", "first", "last", "problem"), [
    ("gangnam", "2026-11-02", "2026-11-06", "ROAD=gangnam: not a road of"),
    ("seoul", "2026-11-06", "2026-11-02", "FROM=2026-11-06 is after TO=2026-11-02"),
    ("seoul", "2026-11-02", "2026-02-30", "TO=2026-02-30: expected a date YYYY-MM-DD"),
])
def test_bad_bounds_are_named(roads, road, first, last, problem):
    with pytest.raises(AnswersheetError, match=re.escape(problem)):
        backfill_bounds(roads, road, first, last)


@pytest.mark.parametrize(("road", "zone"), [("seoul", "Asia/Seoul"), ("seoul_run_day", "Asia/Seoul"),
                                            ("la", "America/Los_Angeles"), ("la_run_day", "America/Los_Angeles")])
def test_from_and_to_are_the_first_and_last_processed_day(home, roads, road, zone):
    """Mon..Sun of a past week: five runs, processing Monday..Friday, for either setting and either zone."""
    out = dry_run(home, roads, road, WEEK[0].isoformat(), WEEK[6].isoformat())
    assert processed_days(out, zone) == WEEKDAYS
    out = dry_run(home, roads, road, WEEK[2].isoformat(), WEEK[2].isoformat())  # one day: Wednesday
    assert processed_days(out, zone) == [WEEK[2].isoformat()]


def test_bare_dates_are_utc_midnight_and_miss_a_day_in_los_angeles(home, roads):
    """Why the bounds: plain `--from-date Mon --to-date Fri` is [Mon 00:00 UTC, Fri 00:00 UTC]. In Seoul the
    09:00 runs fall on 00:00 UTC, so the five days are selected; Los Angeles' 09:00 is 16:00/17:00 UTC, so
    Friday is left out."""
    for road, zone, expected in (("seoul", "Asia/Seoul", WEEKDAYS), ("la", "America/Los_Angeles", WEEKDAYS[:4])):
        code, tail = run_airflow(["backfill", "create", "--dag-id", f"answersheet_{road}", "--from-date", WEEKDAYS[0],
                                  "--to-date", WEEKDAYS[4], "--dry-run"], prepare(home, roads), home / "bare.log")
        assert code == 0, "\n".join(tail)
        assert processed_days((home / "bare.log").read_text(encoding="utf-8"), zone) == expected


def test_make_backfill_local_previews_against_a_local_airflow_without_a_cluster(tmp_path, roads):
    """`make backfill … LOCAL=1`: no kubectl; airflow's --dry-run in a local home (created on first use)."""
    local_home = tmp_path / "local-airflow"
    proc = make("backfill", "ROAD=seoul", f"FROM={WEEK[0]}", f"TO={WEEK[6]}", "LOCAL=1",
                f"ROADS_FILE={roads}", f"AIRFLOW_LOCAL_HOME={local_home}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kubectl" not in proc.stdout + proc.stderr
    assert processed_days(proc.stderr, "Asia/Seoul") == WEEKDAYS
    assert "max_active_runs = 1" in proc.stderr
    assert (local_home / "airflow.db").is_file()
    assert "No runs to create" not in proc.stderr
