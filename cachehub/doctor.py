"""``cachehub doctor``: check, don't assume, what the lake's server guarantees.

cachehub's safety rests on a few promises of the object store (docs/lake-format.md, "The
object-store contract"). Servers that speak "S3" differ in which they keep, so doctor tries
each one with a few small objects under the lake's ``doctor/`` prefix, removes them, and
records what it found in the lake marker, where every later command reads it:

==================  =====================================  =======================================
check               how                                    when it is missing
==================  =====================================  =======================================
create_only         a second create-only write must fail   tag creation and moves are refused
if_match            a write with a stale ETag must fail    tag creation and moves are refused
ranges              a ranged GET must answer 206           whole-object GETs, sliced (degraded)
nested_listing      a delimiter listing must show a        folders are derived from the full
                    prefix holding only deeper keys        listing (degraded)
checksums           an upload with a wrong checksum must   every upload is read back and hashed
                    be refused                             (degraded)
clock_skew          the server's Last-Modified of a fresh  reported: S3 refuses signatures more
                    write against this host's clock        than 15 minutes off
==================  =====================================  =======================================

A check is ``ok``, ``degraded`` (cachehub works around the gap, at some cost) or ``missing``
(operations that need it are refused). ``cachehub doctor`` exits 0 only when every check is
``ok``, and 20 otherwise.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone

from .context import Context
from .errors import ConflictError
from .fsutil import HOST
from .lake import Lake, doctor_prefix
from .results import DoctorCheck, DoctorReport

SKEW_LIMIT_SECONDS = 300.0


def doctor(ctx: Context, *, record: bool = True) -> DoctorReport:
    """Probe the lake's server, record the findings in the lake marker, and report."""
    lake = ctx.lake
    lake.ensure_initialised()
    report = probe(lake)
    if record:
        lake.record_server_facts(report.facts, checked_by=ctx.user)
        ctx.events.audit("doctor", lake=lake.url, ok=report.ok, gaps=[c.name for c in report.checks if c.state != "ok"])
    return report


def probe(lake: Lake) -> DoctorReport:
    backend = lake.backend
    backend.apply_server_facts({})  # probe the server itself, not the degraded paths
    base = doctor_prefix(f"{HOST}-{uuid.uuid4().hex[:12]}")
    checks: list[DoctorCheck] = []
    facts: dict[str, object] = {}
    done = False
    try:
        checks += _conditional_writes(lake, base, facts)
        checks.append(_ranges(lake, base, facts))
        checks.append(_nested_listing(lake, base, facts))
        checks.append(_checksums(lake, base, facts))
        checks.append(_clock(lake, base, facts))
        done = True
    finally:
        # a probe that failed half-way leaves the workarounds recorded before in force
        backend.apply_server_facts(facts if done else lake.server_facts)
        try:
            backend.delete_prefix(base)
        except Exception:  # noqa: BLE001 - cleanup must not hide the probe's own error
            if done:
                raise
    return DoctorReport(lake=lake.url, ok=all(c.state == "ok" for c in checks), checks=checks, facts=facts)


def _conditional_writes(lake: Lake, base: str, facts: dict) -> list[DoctorCheck]:
    backend = lake.backend
    key = f"{base}/cas"
    backend.write(key, b"first", if_none_match=True)
    try:
        backend.write(key, b"second", if_none_match=True)
        create_only = backend.read(key)[0] == b"first"  # an accepted write that changed nothing is still a refusal
    except ConflictError:
        create_only = True
    stale = backend.write(key, b"v1")
    current = backend.write(key, b"v2")
    try:
        backend.write(key, b"v3", if_match=stale)
        if_match = backend.read(key)[0] == b"v2"
    except ConflictError:
        if_match = True
    if if_match:  # the current token must still be accepted
        try:
            backend.write(key, b"v4", if_match=current)
        except ConflictError:  # refuses every conditional write (no usable ETag): no CAS either
            if_match = False
    facts["create_only"], facts["if_match"] = create_only, if_match
    affects = "tags cannot be moved safely, so tag creation and moves are refused"
    return [
        _check("create_only", create_only, "a second create-only write (If-None-Match: *) was refused",
               "the server overwrote an existing key on a create-only write (If-None-Match: * ignored)", affects, "missing"),
        _check("if_match", if_match, "a write with a stale ETag (If-Match) was refused",
               "the server accepted a write with a stale ETag (If-Match ignored)", affects, "missing"),
    ]  # fmt: skip


def _ranges(lake: Lake, base: str, facts: dict) -> DoctorCheck:
    backend = lake.backend
    key = f"{base}/range"
    data = bytes(range(256)) * 4
    backend.write(key, data)
    got = bytes(backend.read_range(key, 100, 200))
    if got != data[100:200]:
        ok = False
        detail = f"a ranged GET of bytes 100-199 returned {len(got)} wrong bytes"
    else:
        ok = getattr(backend, "ranges", True)
        detail = "ranged GETs are answered with 206" if ok else "the server answers a ranged GET with 200 and the whole object"
    facts["ranges"] = ok
    return _check("ranges", ok, detail, detail, "each ranged read fetches the whole object and slices it (more bytes moved for chunk deltas and pieces of large files)", "degraded")


def _nested_listing(lake: Lake, base: str, facts: dict) -> DoctorCheck:
    backend = lake.backend
    backend.write(f"{base}/listing/deep/er/key", b"x")
    ok = "deep" in backend.list_dirs(f"{base}/listing")
    facts["nested_listing"] = ok
    return _check(
        "nested_listing", ok, "a delimiter listing shows prefixes that hold only deeper keys",
        "a delimiter listing left out a prefix that holds only deeper keys",
        "datasets and folders are found from the full listing instead (slower on large lakes); purge never relied on listings",
        "degraded",
    )  # fmt: skip


def _checksums(lake: Lake, base: str, facts: dict) -> DoctorCheck:
    backend = lake.backend
    refused = backend.probe_bad_checksum(f"{base}/checksum")
    facts["checksums"] = refused
    if refused is None:
        verified = backend.uploads_verified()
        how = "cachehub hashes the bytes itself as it writes them" if verified else "this client sends no checksum, so every upload is read back and hashed"
        return DoctorCheck("checksums", "ok", f"uploads are verified: {how}", "")
    return _check(
        "checksums", refused, "an upload with a wrong x-amz-checksum-sha256 was refused",
        "the server stored an upload whose x-amz-checksum-sha256 did not match its bytes",
        "every upload is read back and hashed (push downloads what it uploads)", "degraded",
    )  # fmt: skip


def _clock(lake: Lake, base: str, facts: dict) -> DoctorCheck:
    backend = lake.backend
    key = f"{base}/clock"
    before = time.time()
    backend.write(key, b"t")
    after = time.time()
    server = backend.modified(key)
    # Last-Modified has one-second resolution: a skew within the request's own second is none
    mid = datetime.fromtimestamp((before + after) / 2, tz=timezone.utc)
    skew = (server - mid).total_seconds()
    if abs(skew) <= (after - before) / 2 + 1.0:
        skew = 0.0
    facts["clock_skew_s"] = round(skew, 1)
    ok = abs(skew) <= SKEW_LIMIT_SECONDS
    detail = f"the server's clock is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} this host's" if skew else "the server's clock agrees with this host's"
    return _check("clock_skew", ok, detail, detail,
                  "S3 refuses request signatures more than 15 minutes off, and commit, audit and lease times disagree with the server's; fix the clock (NTP)",
                  "degraded")  # fmt: skip


def _check(name: str, ok: bool | None, good: str, bad: str, affects: str, severity: str) -> DoctorCheck:
    if ok:
        return DoctorCheck(name, "ok", good, "")
    return DoctorCheck(name, severity, bad, affects)
