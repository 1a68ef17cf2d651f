"""Ingest one catalog entry into the versioned store: list, digest, decode, preprocess, write, commit.

Guarantees (see DESIGN.md, "Store"):
- the version digest covers the entry, every source file and the preprocessing plan, so an
  unchanged entry is recognised before anything is decoded and re-running writes nothing;
- each case is written atomically and committed on its own, so an interrupted ingest resumes
  from the committed cases; the version becomes visible only when its manifest is committed;
- a case that fails to decode or validate is quarantined with its reason and the rest
  proceeds; a dataset with no good case fails with the reasons of the first failures.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from infra.settings import Settings
from tasks.catalog import Entry
from tasks.ingest.preprocess import PREPROCESS_VERSION, preprocess_case
from tasks.ingest.readers import SourceUnavailable, list_cases
from tasks.ingest.types import CaseError, CaseRef, RawCase
from tasks.ingest.version import FileDigests, canonical_json, sha256_text, version_digest
from tasks.logs import get_logger

FAULT_ENV = "MEDFOUNDRY_FAULT_INJECT"
PROFILE_MAX_CASES: dict[str, int | None] = {"smoke": 6, "demo": None, "full": None}
STORE_LAYOUT = 1


def _fault_point(point: str) -> None:
    """Test hook: SIGKILL this process at a named point (``$MEDFOUNDRY_FAULT_INJECT``).

    Used by the kill tests to interrupt an ingest at exact places (``after_case:N``,
    ``before_commit``); unset in normal runs, where it costs one dict lookup.
    """
    wanted = os.environ.get(FAULT_ENV)
    if wanted and wanted == point:
        os.kill(os.getpid(), signal.SIGKILL)


class IngestError(RuntimeError):
    """An entry could not be ingested at all (e.g. zero good cases)."""


@dataclass
class IngestPlan:
    """What will be stored for an entry, known before any case is decoded."""

    entry: Entry
    refs: list[CaseRef]
    case_digests: dict[str, str]
    plan: dict[str, Any]
    version: str


def plan_ingest(entry: Entry, base_dir: Path, settings: Settings, profile: str = "demo") -> IngestPlan:
    """List the entry's cases, digest their sources and derive the version digest."""
    refs = sorted(list_cases(entry, base_dir, max_voxels=settings.max_case_voxels), key=lambda r: r.case_id)
    max_cases = PROFILE_MAX_CASES.get(profile)
    if max_cases is not None:
        refs = refs[:max_cases]
    digests = FileDigests(settings.home / "cache" / "file-digests.json")
    # one digest per distinct file: table rows, report lines and slide tiles share theirs
    file_digest = {path: digests.digest(path) for path in dict.fromkeys(p for r in refs if r.source_digest is None
                                                                         for p in r.sources)}
    digests.save()
    case_digests: dict[str, str] = {}
    for ref in refs:
        if ref.source_digest is not None:
            case_digests.setdefault(ref.case_id, ref.source_digest)
        else:
            parts = [file_digest[path] for path in ref.sources]
            case_digests.setdefault(ref.case_id, sha256_text(canonical_json([ref.case_id, parts])))
    plan = {"preprocess": entry.preprocess.model_dump(mode="json"), "preprocess_version": PREPROCESS_VERSION,
            "max_cases": max_cases, "store_layout": STORE_LAYOUT}
    return IngestPlan(entry, refs, case_digests, plan, version_digest(entry, case_digests, plan))


def ingest_entry(entry: Entry, base_dir: Path, settings: Settings, profile: str = "demo") -> dict[str, Any]:
    """Ingest one entry; returns a JSON-safe summary (name, version, status, counts, timings)."""
    from infra.storage import DatasetStore

    log = get_logger()
    started = time.perf_counter()
    try:
        plan = plan_ingest(entry, base_dir, settings, profile)
    except SourceUnavailable as exc:
        log.warning("%s: optional source unavailable, skipped: %s", entry.name, exc)
        return {"name": entry.name, "status": "skipped", "reason": str(exc)}
    store = DatasetStore(settings.store)
    summary: dict[str, Any] = {"name": entry.name, "version": plan.version, "n_listed": len(plan.refs)}
    if store.has_version(entry.name, plan.version):
        info = store.open(entry.name, plan.version)
        log.info("%s: version %s unchanged, nothing to write", entry.name, plan.version[:12])
        return {**summary, "status": "unchanged", "n_cases": len(info.cases) or _n_records(info),
                "n_quarantined": len(info.quarantine), "seconds": time.perf_counter() - started}

    writer = store.writer(entry.name, plan.version, plan.plan)
    done = writer.committed_cases()
    if done:
        log.info("%s: resuming version %s, %d case(s) already committed", entry.name, plan.version[:12], len(done))
    records: list[RawCase] = []
    good, quarantined, bytes_written = len(done), 0, 0
    reasons: list[str] = []
    total = len(plan.refs)
    report_every = max(1, total // 10)
    todo = [ref for ref in plan.refs if ref.case_id not in done]
    for index, (ref, outcome) in enumerate(_processed(todo, entry, settings, plan, writer), start=len(done) + 1):
        if isinstance(outcome, Exception):
            reason = str(outcome) if isinstance(outcome, CaseError) else f"{type(outcome).__name__}: {outcome}"
            writer.quarantine(ref.case_id, reason, ",".join(str(p) for p in ref.sources) or None)
            quarantined += 1
            reasons.append(f"{ref.case_id}: {reason}")
            log.warning("%s: quarantined case %s: %s", entry.name, ref.case_id, reason)
            continue
        if isinstance(outcome, RawCase):
            records.append(outcome)
        else:
            bytes_written += outcome
        good += 1
        _fault_point(f"after_case:{good}")
        if index % report_every == 0 or index == total:
            log.info("%s: %d/%d cases (%d quarantined)", entry.name, index, total, quarantined)
    if records:
        columns = records_to_columns(records, plan.case_digests)
        writer.write_records("records", columns)
        bytes_written += sum(int(np.asarray(v).nbytes) for v in columns.values() if isinstance(v, np.ndarray))
    if good == 0:
        raise IngestError(f"catalog entry '{entry.name}': zero good cases out of {total}; first reasons: "
                          + "; ".join(reasons[:3]) + " (fix the source or the preprocess plan; see `medfoundry data versions`)")
    from tasks.fingerprint import fingerprint_version
    from tasks.loader import split_cases_by_id

    case_ids = sorted(done | {ref.case_id for ref in plan.refs if ref.case_id not in done} - _quarantined_ids(writer))
    fingerprint = fingerprint_version(writer, entry)
    splits = split_cases_by_id(case_ids if entry.dims else [r.case_id for r in records] or case_ids, entry.splits)
    attrs = {"entry": entry.model_dump(mode="json"), "plan": plan.plan, "fingerprint": fingerprint, "splits": splits,
             "case_source_digests": plan.case_digests, "modality": entry.modality, "dims": entry.dims, "task": entry.task,
             "labels": entry.labels, "pairs": entry.pairs.model_dump() if entry.pairs else None}
    _fault_point("before_commit")
    info = writer.commit(attrs)
    seconds = time.perf_counter() - started
    log.info("%s: committed version %s: %d cases, %d quarantined, %.1f s", entry.name, plan.version[:12], good,
             info.n_quarantined, seconds)
    n_cases = info.n_cases if entry.dims else len(records) + len(done)
    return {**summary, "status": "written", "n_cases": n_cases, "n_quarantined": info.n_quarantined,
            "seconds": seconds, "mb_written": bytes_written / 1e6, "uri": info.uri, "fingerprint": fingerprint}


_CASE_ERRORS = (CaseError, ValueError, OSError, RuntimeError, KeyError, IndexError, TypeError, EOFError)


def _process(ref: CaseRef, entry: Entry, settings: Settings, plan: IngestPlan, writer) -> RawCase | int | Exception:
    """Load, preprocess, validate and (for image cases) write one case.

    Returns the bytes written for an image case, the decoded case for a record-like entry
    (records are written together at the end), or the exception that becomes its quarantine
    reason.
    """
    try:
        case = preprocess_case(ref.load(), entry, max_voxels=settings.max_case_voxels)
        if not entry.dims:
            return case
        writer.write_case(ref.case_id, case.arrays, {**case.meta, "source_digest": plan.case_digests[ref.case_id]})
        return sum(int(np.asarray(a).nbytes) for a in case.arrays.values())
    except _CASE_ERRORS as exc:
        return exc


def _processed(refs: list[CaseRef], entry: Entry, settings: Settings, plan: IngestPlan, writer):
    """Yield (ref, outcome) in listing order, with up to ``ingest_threads`` cases in flight.

    Decoding (zlib, pydicom, MONAI resampling) and encoding (blosc, file I/O) release the GIL
    for most of their time, so cases processed side by side keep every core busy; cases are
    independent (each is written and committed on its own), and the look-ahead is bounded so
    memory stays a few cases.
    """
    threads = max(1, settings.ingest_threads)
    if threads == 1 or len(refs) < 2:
        for ref in refs:
            yield ref, _process(ref, entry, settings, plan, writer)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ingest") as pool:
        pending: deque = deque()
        queue = iter(refs)
        for ref in queue:
            pending.append((ref, pool.submit(_process, ref, entry, settings, plan, writer)))
            if len(pending) >= threads + 1:
                break
        while pending:
            ref, future = pending.popleft()
            following = next(queue, None)
            if following is not None:
                pending.append((following, pool.submit(_process, following, entry, settings, plan, writer)))
            yield ref, future.result()


def _quarantined_ids(writer) -> set[str]:
    return {item["case_id"] for item in writer.quarantined()}


def _n_records(reader) -> int:
    """Rows of the version's ``records`` table, from its manifest (no column is decoded)."""
    return reader.n_rows("records") if "records" in reader.tables else 0


def records_to_columns(records: list[RawCase], case_digests: dict[str, str]) -> dict[str, Any]:
    """Turn record-like cases (text, table rows, expression profiles) into columns.

    Text fields become ``text_<field>`` string columns; list/dict metadata is stored as JSON
    strings; arrays of one shape are stacked into an (N, ...) array per name.
    """
    columns: dict[str, Any] = {"case_id": [r.case_id for r in records],
                               "source_digest": [case_digests[r.case_id] for r in records]}
    text_fields = sorted({k for r in records for k in (r.meta.get("text") or {})})
    for field in text_fields:
        columns[f"text_{field}"] = [(r.meta.get("text") or {}).get(field, "") or "" for r in records]
    meta_keys = sorted({k for r in records for k in r.meta} - {"text", "source_files", "original_shape", "dtype"})
    for key in meta_keys:
        values = [r.meta.get(key) for r in records]
        if all(isinstance(v, bool) for v in values):
            columns[key] = np.asarray(values, dtype=bool)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            columns[key] = np.asarray(values, dtype=np.float64)
        elif all(isinstance(v, str) for v in values):
            columns[key] = list(values)
        else:
            columns[key] = [canonical_json(v) for v in values]
    names = sorted({k for r in records for k in r.arrays})
    for name in names:
        shapes = {np.asarray(r.arrays[name]).shape for r in records if name in r.arrays}
        if len(shapes) != 1 or any(name not in r.arrays for r in records):
            raise IngestError(f"records array '{name}' must have one shape in every record, got {sorted(shapes)}")
        columns[name] = np.stack([np.asarray(r.arrays[name]) for r in records])
    return columns
