"""The stage contract: one runner drives the manifest protocol (`answersheet.manifest`) for every stage.

A stage reads its upstream manifests (`read_upstream`: missing one -> "run the X stage first"; built from
outputs that are no longer current -> "re-run X"), computes its inputs digest, and hands the runner a
`Stage` (manifest key, digest, what it read, which prefix it owns) and a `work` function from its inputs
to a `StageResult` (outputs, counts, manifest records). The runner then, always in this order:

1. skips — returning the old counts — only when the manifest is current *and* its outputs are verifiably
   still in storage (`manifest.current`), unless the stage names a reason to redo (`Stage.redo`);
2. deletes the manifest (`manifest.begin`) before any output is written — after the stage's `setup`
   (detect loads and checks its model there, so a config error leaves the old manifest alone);
3. runs `work`;
4. removes stale objects: everything under the owned prefix that is not an output (`Stage.clean` when a
   stage shares its prefix, as detect's shards do);
5. commits the manifest, last;
6. returns the summary the CLI prints and the DAG reads from XCom: `manifest`, `counts`, `skipped`, plus
   the stage's own keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from answersheet import manifest
from answersheet.day import RoadDay
from answersheet.storage import Store

STAGES = manifest.STAGES


@dataclass(frozen=True)
class StageResult:
    """What a stage's work produced."""

    outputs: dict[str, str]  # object key -> sha256: what the manifest proves
    counts: dict[str, Any]
    records: dict[str, Any] = field(default_factory=dict)  # the stage's own manifest fields (JSON)
    summary: dict[str, Any] = field(default_factory=dict)  # extra summary keys of a run that did the work


@dataclass(frozen=True)
class Stage:
    """One stage run for one road-day, as the runner needs it."""

    name: str
    key: str  # its manifest
    digest: str  # its inputs digest
    upstream: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # manifests read: key -> manifest
    owns: str | None = None  # the prefix whose objects are all this stage's outputs (the rest is stale)
    clean: Callable[[dict[str, str]], int | None] | None = None  # stale cleanup for a prefix shared (detect shards)
    redo: Callable[[dict[str, Any]], bool] | None = None  # a current manifest that must be redone all the same
    setup: Callable[[], AbstractContextManager[Any]] | None = None  # before begin; its value goes to work
    summary: dict[str, Any] = field(default_factory=dict)  # extra summary keys, skipped or not


def read_upstream(rd: RoadDay, key: str, stage: str, expect: Iterable[str] = (),
                  known: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The upstream manifest at key (written by `stage`), or one error naming the stage to run first;
    with `expect`, also refused when built from outputs other than the current ones (the digest chain)."""
    found = manifest.require(rd.store, key, stage)
    check_chain(rd.store, {key: found}, expect, known)
    return found


def check_chain(store: Store, manifests: Mapping[str, Mapping[str, Any]], expect: Iterable[str],
                known: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Each manifest must record the upstream `expect` keys, built from their current outputs."""
    expect = list(expect)
    if not expect:
        return
    for key, found in manifests.items():
        manifest.check_upstream(store, key, found, expect=expect, known=known)


def remove_stale(store: Store, stage: Stage, outputs: dict[str, str]) -> int:
    """Delete what an earlier run left that this run did not write (nothing outside the stage's prefix)."""
    if stage.clean is not None:
        return int(stage.clean(outputs) or 0)
    if stage.owns is None:
        return 0
    return store.delete_stale(stage.owns, set(outputs) | {stage.key})


def summary(rd: RoadDay, stage: Stage, counts: dict[str, Any], skipped: bool, **extra: Any) -> dict[str, Any]:
    """What the CLI prints and writes for XCom."""
    return {"manifest": rd.store.uri(stage.key), "counts": counts, "skipped": skipped, **stage.summary, **extra}


def run(rd: RoadDay, stage: Stage, work: Callable[..., StageResult]) -> dict[str, Any]:
    """Skip, or begin -> work -> remove stale -> commit; returns the summary. `work` takes the value of
    `stage.setup` when the stage has one, nothing otherwise."""
    existing = manifest.current(rd.store, stage.key, stage.digest, rd.force)
    if existing is not None and not (stage.redo and stage.redo(existing)):
        return summary(rd, stage, existing.get("counts", {}), skipped=True)
    with stage.setup() if stage.setup else nullcontext() as ready:
        started = manifest.begin(rd.store, stage.key)
        result = work(ready) if stage.setup else work()
    remove_stale(rd.store, stage, result.outputs)
    manifest.commit(rd.store, stage.key, stage.name, stage.digest, result.outputs, result.counts, started,
                    upstream=manifest.upstream(stage.upstream), **result.records)
    return summary(rd, stage, result.counts, skipped=False, **result.summary)
