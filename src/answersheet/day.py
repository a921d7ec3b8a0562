"""The one thing every stage gets: which road, which day, which bucket, and whether to redo."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from answersheet.config import RoadConfig
from answersheet.layout import DayLayout
from answersheet.storage import Store


@dataclass(frozen=True)
class RoadDay:
    """A road's configuration, one logical date, the bucket, and the --force flag."""

    road: RoadConfig
    day: dt.date
    store: Store
    force: bool = False

    @property
    def layout(self) -> DayLayout:
        return DayLayout(self.road.id, self.day)
