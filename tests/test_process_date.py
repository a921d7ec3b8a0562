"""Which day a run processes (`schedule.process_date`), over real weeks, through the timetable Airflow's
scheduler runs (the DAG serialized and deserialized, as the scheduler loads it) and the stage command the
task renders from the run's logical date.

previous_run (default, the seed's Airflow-2 `schedule_interval`): the run at Tue 09:00 processes Monday and
the run at Mon 09:00 processes Friday. run_day: the 09:00 run processes its own day.
"""

from __future__ import annotations

import datetime as dt

import pendulum
import pytest
from dagtest import dag_run, parse, write_roads

pytestmark = pytest.mark.fast

KST = "Asia/Seoul"
LA = "America/Los_Angeles"  # DST ends Sunday 2026-11-01 02:00 (UTC-7 -> UTC-8)


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    """Four roads: Seoul and Los Angeles, each with both process_date settings (weekdays 09:00 local)."""
    roads = []
    for zone, tag in ((KST, "seoul"), (LA, "la")):
        for mode in ("previous_run", "run_day"):
            roads.append({"id": f"{tag}_{mode}", "schedule": {"timezone": zone, "process_date": mode,
                                                                "start_date": "2026-10-26"}})
    bag = parse(write_roads(tmp_path_factory.mktemp("roads") / "roads.yaml", roads))
    assert bag.import_errors == {}
    return bag


def processed_day(dag, logical_date) -> str:
    """`--date` of the ingest command the task renders for a run with this logical date."""
    task = dag.get_task("ingest")
    args = task.render_template(task.arguments, {"dag_run": dag_run(logical_date)})
    return args[args.index("--date") + 1]


def scheduled_runs(dag, until: pendulum.DateTime) -> list[tuple[pendulum.DateTime, str]]:
    """(run time, processed day) of every run the scheduler creates from start_date to `until`, stepping the
    deserialized DAG's timetable as the scheduler does (each run after the previous run's data interval)."""
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.timetables.base import TimeRestriction

    scheduler_dag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    restriction = TimeRestriction(earliest=dag.start_date, latest=None, catchup=True)
    runs, last = [], None
    while True:
        info = scheduler_dag.timetable.next_dagrun_info(last_automated_data_interval=last, restriction=restriction)
        if info is None or info.run_after > until:
            return runs
        runs.append((info.run_after, processed_day(dag, info.logical_date)))
        last = info.data_interval


def due_at(runs, now: pendulum.DateTime) -> str:
    """The processed day of the latest run the scheduler has started by `now` (its run time has come)."""
    return [day for run_after, day in runs if run_after <= now][-1]


def kst(day: int, hour: int, minute: int = 0) -> pendulum.DateTime:
    return pendulum.datetime(2026, 11, day, hour, minute, tz=KST)


def test_previous_run_processes_the_day_before_and_monday_processes_friday(bag):
    runs = scheduled_runs(bag.dags["answersheet_seoul_previous_run"], kst(13, 9))
    week = [(run_after.in_timezone(KST).strftime("%a %d %H:%M"), day) for run_after, day in runs
            if run_after >= kst(3, 0)]
    assert week == [
        ("Tue 03 09:00", "2026-11-02"),  # Monday
        ("Wed 04 09:00", "2026-11-03"),
        ("Thu 05 09:00", "2026-11-04"),
        ("Fri 06 09:00", "2026-11-05"),
        ("Mon 09 09:00", "2026-11-06"),  # Friday; nothing runs for Saturday or Sunday
        ("Tue 10 09:00", "2026-11-09"),
        ("Wed 11 09:00", "2026-11-10"),
        ("Thu 12 09:00", "2026-11-11"),
        ("Fri 13 09:00", "2026-11-12"),
    ]
    assert {run_after.in_timezone("UTC").strftime("%H:%M") for run_after, _ in runs} == {"00:00"}  # no DST


def test_run_day_processes_the_day_of_the_run(bag):
    runs = scheduled_runs(bag.dags["answersheet_seoul_run_day"], kst(9, 9))
    assert [(r.in_timezone(KST).strftime("%a %d %H:%M"), d) for r, d in runs if r >= kst(2, 0)] == [
        ("Mon 02 09:00", "2026-11-02"), ("Tue 03 09:00", "2026-11-03"), ("Wed 04 09:00", "2026-11-04"),
        ("Thu 05 09:00", "2026-11-05"), ("Fri 06 09:00", "2026-11-06"), ("Mon 09 09:00", "2026-11-09")]


@pytest.mark.parametrize(("now", "previous_run", "run_day"), [
    (kst(4, 8, 59), "2026-11-02", "2026-11-03"),  # Wed 08:59: Tuesday's run is the latest
    (kst(4, 9, 0), "2026-11-03", "2026-11-04"),   # Wed 09:00: the new run
    (kst(9, 8, 59), "2026-11-05", "2026-11-06"),  # Mon 08:59: Friday's run (Thursday / Friday)
    (kst(9, 9, 0), "2026-11-06", "2026-11-09"),   # Mon 09:00: previous_run processes Friday
    (kst(8, 12, 0), "2026-11-05", "2026-11-06"),  # Sunday noon: still Friday's run
])
def test_the_run_at_0859_and_at_0900(bag, now, previous_run, run_day):
    assert due_at(scheduled_runs(bag.dags["answersheet_seoul_previous_run"], now), now) == previous_run
    assert due_at(scheduled_runs(bag.dags["answersheet_seoul_run_day"], now), now) == run_day


def test_a_dst_zone_keeps_0900_local_and_the_same_days(bag):
    """Los Angeles leaves DST on Sunday 2026-11-01: the runs stay at 09:00 local (16:00 -> 17:00 UTC) and the
    processed days are the same weekdays as in Seoul."""
    until = pendulum.datetime(2026, 11, 4, 12, tz=LA)
    runs = scheduled_runs(bag.dags["answersheet_la_previous_run"], until)
    assert [(r.in_timezone(LA).strftime("%a %m-%d %H:%M"), r.in_timezone("UTC").strftime("%H:%M"), d)
            for r, d in runs] == [
        ("Tue 10-27 09:00", "16:00", "2026-10-26"),
        ("Wed 10-28 09:00", "16:00", "2026-10-27"),
        ("Thu 10-29 09:00", "16:00", "2026-10-28"),
        ("Fri 10-30 09:00", "16:00", "2026-10-29"),
        ("Mon 11-02 09:00", "17:00", "2026-10-30"),  # across the DST change: still Friday, still 09:00 local
        ("Tue 11-03 09:00", "17:00", "2026-11-02"),
        ("Wed 11-04 09:00", "17:00", "2026-11-03"),
    ]
    run_day = scheduled_runs(bag.dags["answersheet_la_run_day"], until)
    assert [d for _, d in run_day] == ["2026-10-26", "2026-10-27", "2026-10-28", "2026-10-29", "2026-10-30",
                                       "2026-11-02", "2026-11-03", "2026-11-04"]


@pytest.mark.parametrize("dag_id", ["answersheet_seoul_previous_run", "answersheet_seoul_run_day",
                                    "answersheet_la_previous_run"])
def test_a_manual_run_or_dags_test_processes_its_logical_date(bag, dag_id):
    """`airflow dags test <dag> 2026-11-02` or a trigger with that logical date processes that day, whatever
    the data interval Airflow infers for it (the docs: for manual runs use the logical date)."""
    dag = bag.dags[dag_id]
    zone = dag.timezone.name
    for hour in (0, 8, 12, 23):
        assert processed_day(dag, pendulum.datetime(2026, 11, 2, hour, 59, tz=zone)) == "2026-11-02"


def test_the_date_reaches_command_labels_and_doc(bag):
    dag = bag.dags["answersheet_seoul_previous_run"]
    task = dag.get_task("detect")
    context = {"dag_run": dag_run(kst(2, 9))}  # the run at Tue 03 09:00 (data interval start Mon 02 09:00)
    assert task.render_template(task.labels, context)["answersheet.io/date"] == "2026-11-02"
    assert "--date" in task.arguments and task.render_template(task.arguments, context)[
        task.arguments.index("--date") + 1] == "2026-11-02"
    assert "`schedule.process_date: previous_run`" in dag.doc_md and "Monday 09:00 Friday" in dag.doc_md
    assert "`schedule.process_date: run_day`" in bag.dags["answersheet_seoul_run_day"].doc_md


def test_bad_process_date_is_named(tmp_path):
    bag = parse(write_roads(tmp_path / "roads.yaml", [{"id": "r1", "schedule": {"process_date": "yesterday"}}]))
    (error,) = bag.import_errors.values()
    assert "road 'r1': key 'schedule.process_date': must be one of ('previous_run', 'run_day'), got 'yesterday'" \
        in error


def test_start_date_is_the_first_processed_day(bag):
    """start_date 2026-10-26 (a Monday): previous_run's first run processes that Monday (run at Tue 09:00)."""
    first_run, first_day = scheduled_runs(bag.dags["answersheet_seoul_previous_run"], kst(13, 9))[0]
    assert (first_run, first_day) == (pendulum.datetime(2026, 10, 27, 9, tz=KST), "2026-10-26")
    assert dt.date.fromisoformat(first_day).weekday() == 0
