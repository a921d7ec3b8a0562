"""Local mode: a stage's command line as a subprocess of the task (no cluster: laptops, CI, `make demo`)."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from answersheet_dagkit.commands import LOG_TIMESTAMPS_ENV
from answersheet_dagkit.lineage import record_answer_sheet

CLI_ENV = "ANSWERSHEET_CLI"
# `answersheet: error: ...` (exit 1, AnswersheetError) or argparse's `answersheet <stage>: error: ...` (exit 2)
ERROR_LINE = re.compile(r"^answersheet( [a-z]+)?: error: ")
# A stage CLI log line without its timestamp: `INFO answersheet.detect: ...`
CLI_LOG_LINE = re.compile(r"^(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) (?P<logger>[\w.]+): (?P<message>.*)$")


def resolve_cli() -> str:
    """$ANSWERSHEET_CLI, else the `answersheet` installed next to this Python, else the one on PATH."""
    if os.environ.get(CLI_ENV):
        if found := shutil.which(os.environ[CLI_ENV]):
            return found
        raise AirflowFailException(f"{CLI_ENV}={os.environ[CLI_ENV]}: not an executable file or command")
    beside = Path(sys.executable).parent / "answersheet"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    if found := shutil.which("answersheet"):
        return found
    raise AirflowFailException(
        f"local mode: no `answersheet` executable next to {sys.executable} or on PATH (set {CLI_ENV})")


class AnswersheetCliOperator(BaseOperator):
    """Run `answersheet <stage> ...` locally, its output in the task log (CLI log lines keep level and logger);
    return its summary (XCom). Exit 1 or 2 with an `answersheet: error:` line is bad input, config or arguments:
    no retries. Any other failure (crash, signal) may be retried. Asset outlets get the day (lineage)."""

    template_fields = ("command",)
    ui_color = "#e8f4ea"

    def __init__(self, *, command: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.command = command
        self._proc: subprocess.Popen | None = None

    def execute(self, context: Any) -> Any:
        with tempfile.TemporaryDirectory(prefix="answersheet-task-") as tmp:
            summary, error_line = Path(tmp) / "summary.json", None
            argv = [resolve_cli(), *self.command[1:], "--summary-json", str(summary)]
            self.log.info("running: %s", shlex.join(argv))
            self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          errors="replace", env={**os.environ, LOG_TIMESTAMPS_ENV: "0"})
            for line in self._proc.stdout or ():
                line = line.rstrip("\n")
                if match := CLI_LOG_LINE.match(line):
                    logging.getLogger(match["logger"]).log(getattr(logging, match["level"]), "%s", match["message"])
                else:
                    self.log.info("%s", line)
                error_line = line if ERROR_LINE.match(line) else error_line
            code = self._proc.wait()
            if code == 0:
                result = json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else None
                record_answer_sheet(context, self.outlets, self.command, result)
                return result
            if code in (1, 2) and error_line:
                raise AirflowFailException(error_line)
            detail = f": {error_line}" if error_line else ""
            raise AirflowException(f"{self.command[1]} exited with code {code}{detail}")

    def on_kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
