"""Locust users, the load shape and the per-run state they share.

* :class:`JobUser` - a pool of job clients: each takes the next arrival from the merged tenant
  schedule (:mod:`loadtest.arrivals`), waits for its time, submits it (JSON with a data-URL
  image), follows it to a terminal state by polling or SSE, cancels it if the arrival says so,
  and downloads the clip. Every job leaves a :class:`~loadtest.records.JobRecord`.
* :class:`PollUser` - the status-poll storm: GET of known jobs, job lists and short SSE reads.
* :class:`ProfileShape` - the ``LoadTestShape``: job clients at once, poll clients ramped, and
  the stop: window over and nothing in flight, max jobs done, max requests, or the hard limit
  (window + drain timeout).

Works in-process (``python -m loadtest.run``), with the Locust CLI (``loadtest/locustfile.py``)
and distributed (master + workers, ``k8s/loadtest/``): workers send their records to the master
with Locust's custom messages and the master writes the report.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import random
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import gevent
from locust import HttpUser, LoadTestShape, constant, task
from locust.runners import MasterRunner, WorkerRunner

from .arrivals import Arrival, ArrivalQueue
from .profile import Profile
from .records import TERMINAL, JobRecord, gradient_png

logger = logging.getLogger("loadtest")

MSG_RECORDS = "svd_loadtest_records"
MSG_FINAL = "svd_loadtest_final"
MSG_FLUSH = "svd_loadtest_flush"
FLUSH_INTERVAL_S = 2.0
MAX_FOLLOW_ERRORS = 10


class RunState:
    """Everything one load generator (the local process or one Locust worker) shares."""

    def __init__(self, environment, profile: Profile, keys: dict[str, str], *, index: int = 0,
                 workers: int = 1) -> None:
        self.environment = environment
        self.profile = profile
        self.keys = keys
        self.index, self.workers = index, workers
        self.share = 1.0 / workers
        self.queue = ArrivalQueue(profile, share=self.share, index=index, workers=workers)
        self.max_requests = max(1, math.ceil(profile.max_requests * self.share))
        self.rng = random.Random(f"{profile.seed}/{index}/polls")
        self.t0_mono: float | None = None
        self.t0_epoch: float | None = None
        self.records: list[JobRecord] = []
        self.active: dict[int, JobRecord] = {}  # reserved or in flight
        self.reserved_by_tenant: Counter[str] = Counter()
        self.known_jobs: deque[tuple[str, str]] = deque(maxlen=500)  # (tenant, job id) for pollers
        self.requests = 0
        self.http: Counter[tuple[str, str, int]] = Counter()
        self.http_by_tenant: Counter[tuple[str, int]] = Counter()
        self.stop_reason: str | None = None
        self.finished = False
        self._images: dict[tuple[int, int], str] = {}
        self._flusher = None
        self.remote: dict[str, dict[str, Any]] = {}  # master: per-worker status
        self.remote_records: list[JobRecord] = []
        self.remote_final: set[str] = set()
        environment.events.request.add_listener(self._on_request)

    # -- clock ------------------------------------------------------------------------------------

    def start(self) -> None:
        if self.t0_mono is None:
            self.t0_mono, self.t0_epoch = time.monotonic(), time.time()

    def elapsed(self) -> float:
        return 0.0 if self.t0_mono is None else time.monotonic() - self.t0_mono

    @property
    def in_window(self) -> bool:
        return self.elapsed() < self.profile.duration

    # -- bookkeeping ------------------------------------------------------------------------------

    def _on_request(self, request_type, name, response_time, response_length, response=None, context=None,
                    exception=None, **_kwargs) -> None:
        status = int(getattr(response, "status_code", 0) or 0)
        self.requests += 1
        self.http[(request_type, name, status)] += 1
        tenant = (context or {}).get("tenant")
        if tenant:
            self.http_by_tenant[(tenant, status)] += 1
        if self.requests >= self.max_requests and self.stop_reason is None:
            self.stop_reason = f"max_requests ({self.profile.max_requests}) reached"

    def key_of(self, tenant: str) -> str:
        key = self.keys.get(tenant) or self.keys.get("*")
        if not key:
            raise KeyError(f"no API key for tenant {tenant!r}")
        return key

    def can_start(self, tenant: str) -> bool:
        cap = self.queue.caps.get(tenant)
        return cap is None or self.reserved_by_tenant[tenant] < max(1, math.ceil(cap * self.share))

    def reserve(self, arrival: Arrival) -> JobRecord:
        clip = arrival.clip
        record = JobRecord(
            seq=arrival.seq, tenant=arrival.tenant, scheduled_at=(self.t0_epoch or time.time()) + arrival.at,
            clip=clip.body(), work_units=clip.work_units, worker=self.index,
            follow=self.profile.follow_of(self.profile.tenant(arrival.tenant)),
            cancel_planned_after=arrival.cancel_after,
        )
        self.records.append(record)
        self.active[record.seq] = record
        self.reserved_by_tenant[arrival.tenant] += 1
        return record

    def release(self, record: JobRecord) -> None:
        if self.active.pop(record.seq, None) is not None:
            self.reserved_by_tenant[record.tenant] -= 1

    def image_url(self, width: int, height: int) -> str:
        key = (width, height)
        if key not in self._images:
            data = Path(self.profile.image).read_bytes() if self.profile.image else gradient_png(width, height)
            self._images[key] = "data:image/png;base64," + base64.b64encode(data).decode()
        return self._images[key]

    # -- stopping ---------------------------------------------------------------------------------

    @property
    def arrivals_done(self) -> bool:
        return self.queue.exhausted or not self.in_window

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None or self.finished

    def locally_done(self) -> bool:
        storm_over = self.profile.poll_storm is None or not self.in_window
        return self.arrivals_done and not self.active and storm_over

    def check_stop(self) -> str | None:
        """Why this run should stop now, or None (used by the shape)."""
        if self.stop_reason:
            return self.stop_reason
        if self.t0_mono is None:
            return None
        limit = self.profile.duration + self.profile.drain_timeout
        if self.elapsed() >= limit:
            self.stop_reason = f"time limit ({limit:.0f}s = window + drain timeout) reached"
        elif isinstance(self.environment.runner, MasterRunner):
            expected = max(1, self.environment.runner.worker_count)
            done = [s for s in self.remote.values() if s.get("done")]
            if self.elapsed() >= self.profile.duration and len(done) >= expected:
                self.stop_reason = "all workers done"
            if sum(s.get("requests", 0) for s in self.remote.values()) >= self.profile.max_requests:
                self.stop_reason = f"max_requests ({self.profile.max_requests}) reached"
        elif self.locally_done():
            self.stop_reason = ("all jobs finished" if self.queue.exhausted and self.queue.taken >= self.queue.max_jobs
                                else "load window over and all jobs finished")
        return self.stop_reason

    def finish(self) -> None:
        """Mark what never finished and cancel it on the service (best effort)."""
        if self.finished:
            return
        self.finished = True
        self.stop_reason = self.stop_reason or "stopped"
        import requests

        host = self.environment.host
        for record in list(self.active.values()):
            if record.submitted_at is None:
                record.status = "not_sent"
            elif record.status not in TERMINAL and record.status != "rejected":
                if record.job_id and host:
                    try:
                        requests.post(f"{host}/v1/videos/{record.job_id}/cancel", timeout=5,
                                      headers={"Authorization": f"Bearer {self.key_of(record.tenant)}"})
                    except Exception:  # noqa: BLE001 - best effort
                        pass
                record.status = "unfinished"
            self.release(record)

    # -- distributed: worker -> master ------------------------------------------------------------

    def final_records(self) -> list[JobRecord]:
        """Records that will not change any more."""
        return [r for r in self.records if r.seq not in self.active]

    def flush_to_master(self, final: bool = False) -> None:
        runner = self.environment.runner
        if not isinstance(runner, WorkerRunner):
            return
        done = self.final_records()
        sent_ids = getattr(self, "_sent_ids", set())
        batch = [r.to_json() for r in done if r.seq not in sent_ids]
        sent_ids.update(r["seq"] for r in batch)
        self._sent_ids = sent_ids
        payload = {"worker": self.index, "records": batch, "done": self.locally_done(), "requests": self.requests,
                   "http": [[k[0], k[1], k[2], v] for k, v in self.http.items()],
                   "http_by_tenant": [[k[0], k[1], v] for k, v in self.http_by_tenant.items()],
                   "t0_epoch": self.t0_epoch}
        runner.send_message(MSG_FINAL if final else MSG_RECORDS, payload)

    def start_flusher(self) -> None:
        def loop():
            while not self.finished:
                gevent.sleep(FLUSH_INTERVAL_S)
                try:
                    self.flush_to_master()
                except Exception:  # noqa: BLE001
                    logger.exception("sending records to the master failed")

        if isinstance(self.environment.runner, WorkerRunner) and self._flusher is None:
            self._flusher = gevent.spawn(loop)

    def on_worker_message(self, msg, final: bool = False) -> None:
        data = msg.data
        node = str(msg.node_id)
        self.remote[node] = {"done": data.get("done"), "requests": data.get("requests", 0),
                             "http": data.get("http", []), "http_by_tenant": data.get("http_by_tenant", [])}
        self.remote_records.extend(JobRecord.from_json(r) for r in data.get("records", []))
        if data.get("t0_epoch") and (self.t0_epoch is None or data["t0_epoch"] < self.t0_epoch):
            self.t0_epoch = data["t0_epoch"]
        if final:
            self.remote_final.add(node)

    def all_records(self) -> list[JobRecord]:
        if isinstance(self.environment.runner, MasterRunner):
            return sorted(self.remote_records, key=lambda r: (r.scheduled_at, r.worker, r.seq))
        return self.records

    def all_http(self) -> tuple[Counter, Counter]:
        if not isinstance(self.environment.runner, MasterRunner):
            return self.http, self.http_by_tenant
        http, by_tenant = Counter(), Counter()
        for status in self.remote.values():
            for method, name, code, n in status["http"]:
                http[(method, name, int(code))] += n
            for tenant, code, n in status["http_by_tenant"]:
                by_tenant[(tenant, int(code))] += n
        return http, by_tenant


def state_of(environment) -> RunState:
    state = getattr(environment, "loadtest", None)
    if state is None:
        raise RuntimeError("the load-test state is not set up (loadtest.users.setup was not called)")
    return state


def setup(environment, profile: Profile, keys: dict[str, str], *, index: int = 0, workers: int = 1) -> RunState:
    """Attach a :class:`RunState` to a Locust environment and size the user classes from the profile."""
    missing = [t.name for t in profile.tenants if t.name not in keys and "*" not in keys]
    if missing and not isinstance(environment.runner, MasterRunner):
        raise ValueError(f"no API key for tenant(s) {', '.join(missing)}: pass --keys NAME=KEY,... "
                         "(or one bare KEY used for every tenant)")
    previous = getattr(environment, "loadtest", None)
    if previous is not None:  # re-setup (a worker learning its index): keep one request listener
        environment.events.request.remove_listener(previous._on_request)
    state = RunState(environment, profile, keys, index=index, workers=workers)
    environment.loadtest = state
    JobUser.fixed_count = profile.concurrency
    if profile.poll_storm is not None:
        PollUser.wait_time = constant(0)  # paced inside the task, so a stop is noticed quickly
    return state


# -- users ----------------------------------------------------------------------------------------


class _ApiUser(HttpUser):
    abstract = True

    def _auth(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.state.key_of(tenant)}"}

    @property
    def state(self) -> RunState:
        return state_of(self.environment)


class JobUser(_ApiUser):
    """One job client: takes the next arrival, submits it, follows it, downloads the clip."""

    wait_time = constant(0)
    fixed_count = 1
    weight = 1

    @task
    def next_job(self) -> None:
        state = self.state
        if state.stopping or state.t0_mono is None:
            gevent.sleep(0.5)
            return
        if not state.in_window:
            gevent.sleep(0.5)
            return
        arrival = state.queue.take(state.can_start)
        if arrival is None:
            gevent.sleep(0.5)
            return
        if arrival == ArrivalQueue.WAIT:
            gevent.sleep(0.1)
            return
        record = state.reserve(arrival)
        try:
            delay = arrival.at - state.elapsed()
            if delay > 0:
                gevent.sleep(delay)
            if state.stopping:
                record.status = "not_sent"
                return
            self._run_job(record, arrival)
        except gevent.GreenletExit:
            raise
        except Exception as error:  # noqa: BLE001 - a client bug must not stop the run
            logger.exception("job client error")
            record.status, record.error_code = "error", f"client: {type(error).__name__}"
        finally:
            # Anything else is still running on the service because the run is stopping:
            # it stays active, and RunState.finish() cancels it and marks it unfinished.
            if record.status in TERMINAL or record.status in ("rejected", "not_sent", "error"):
                state.release(record)

    # -- one job --------------------------------------------------------------------------------

    def _run_job(self, record: JobRecord, arrival: Arrival) -> None:
        if not self._submit(record, arrival):
            return
        canceller = None
        if arrival.cancel_after is not None:
            canceller = gevent.spawn(self._cancel_later, record, arrival.cancel_after)
        try:
            if record.follow == "sse":
                self._follow_sse(record)
            if record.status not in TERMINAL:
                self._follow_poll(record)
        finally:
            if canceller is not None:
                canceller.kill(block=False)
        if record.status == "completed" and self.state.profile.download_of(self.state.profile.tenant(record.tenant)):
            self._download(record)
        record.done_at = time.time()

    def _submit(self, record: JobRecord, arrival: Arrival) -> bool:
        state = self.state
        clip = arrival.clip
        body = {"image_url": state.image_url(clip.width, clip.height), **clip.body()}
        headers = {**self._auth(record.tenant), "Idempotency-Key": f"lt-{state.t0_epoch:.0f}-{state.index}-{record.seq}"}
        retries = state.profile.retry_on_429
        for attempt in range(retries + 1):
            if record.submitted_at is None:
                record.submitted_at = time.time()
            record.submit_attempts += 1
            with self.client.post("/v1/videos", json=body, headers=headers, name="POST /v1/videos",
                                  timeout=state.profile.request_timeout, catch_response=True,
                                  context={"tenant": record.tenant}) as response:
                status = int(getattr(response, "status_code", 0) or 0)
                record.submit_status = status
                if status == 202:
                    response.success()
                    record.accepted_at = time.time()
                    record.update_from_job(response.json(), record.accepted_at)
                    state.known_jobs.append((record.tenant, record.job_id))
                    return True
                record.submit_error = _error_code(response)
                response.failure(f"HTTP {status} {record.submit_error or ''}".strip())
                retry_after = _retry_after(response)
                record.retry_after = retry_after
            if status == 429 and attempt < retries and not state.stopping:
                gevent.sleep(min(retry_after if retry_after is not None else 1.0, 30.0))
                continue
            break
        record.status = "rejected"
        record.done_at = time.time()
        return False

    def _get_job(self, record: JobRecord) -> int:
        with self.client.get(f"/v1/videos/{record.job_id}", headers=self._auth(record.tenant),
                             name="GET /v1/videos/{id}", timeout=self.state.profile.request_timeout,
                             catch_response=True, context={"tenant": record.tenant}) as response:
            status = int(getattr(response, "status_code", 0) or 0)
            record.polls += 1
            if status == 200:
                response.success()
                record.update_from_job(response.json(), time.time())
            else:
                response.failure(f"HTTP {status}")
        return status

    def _follow_poll(self, record: JobRecord) -> None:
        state = self.state
        errors = 0
        interval = state.profile.poll_interval
        while record.status not in TERMINAL and not state.stopping:
            gevent.sleep(interval)
            status = self._get_job(record)
            if status == 200:
                errors = 0
                continue
            errors += 1
            if status == 404 or errors >= MAX_FOLLOW_ERRORS:
                record.status, record.error_code = "error", f"follow: HTTP {status}"
                return

    def _follow_sse(self, record: JobRecord) -> None:
        """Read the job's event stream to its end; any hiccup falls back to polling."""
        state = self.state
        try:
            with self.client.get(f"/v1/videos/{record.job_id}/events", headers=self._auth(record.tenant),
                                 name="GET /v1/videos/{id}/events", stream=True,
                                 timeout=state.profile.request_timeout, catch_response=True,
                                 context={"tenant": record.tenant}) as response:
                status = int(getattr(response, "status_code", 0) or 0)
                if status != 200:
                    response.failure(f"HTTP {status}")
                    return
                response.success()
                for _event, data in iter_sse(response.iter_lines(decode_unicode=True)):
                    record.update_from_job(json.loads(data), time.time())
                    if record.status in TERMINAL or state.stopping:
                        break
                response.close()
        except gevent.GreenletExit:
            raise
        except Exception as error:  # noqa: BLE001 - dropped stream: polling takes over
            logger.debug("SSE stream of %s ended early: %r", record.job_id, error)

    def _cancel_later(self, record: JobRecord, delay: float) -> None:
        wait = (record.accepted_at or time.time()) + delay - time.time()
        if wait > 0:
            gevent.sleep(wait)
        if record.status in TERMINAL or self.state.stopping:
            return
        record.cancel_requested_at = time.time()
        with self.client.post(f"/v1/videos/{record.job_id}/cancel", headers=self._auth(record.tenant),
                              name="POST /v1/videos/{id}/cancel", timeout=self.state.profile.request_timeout,
                              catch_response=True, context={"tenant": record.tenant}) as response:
            status = int(getattr(response, "status_code", 0) or 0)
            record.cancel_status = status
            if status in (200, 409):  # 409: it finished first, which is a valid outcome
                response.success()
            else:
                response.failure(f"HTTP {status}")

    def _download(self, record: JobRecord) -> None:
        start = time.perf_counter()
        size = 0
        head = b""
        with self.client.get(f"/v1/videos/{record.job_id}/content", headers=self._auth(record.tenant),
                             name="GET /v1/videos/{id}/content", stream=True,
                             timeout=self.state.profile.request_timeout, catch_response=True,
                             context={"tenant": record.tenant}) as response:
            status = int(getattr(response, "status_code", 0) or 0)
            record.download_status = status
            if status == 200:
                try:
                    for chunk in response.iter_content(64 * 1024):
                        if len(head) < 12:
                            head += chunk[:12]
                        size += len(chunk)
                except Exception as error:  # noqa: BLE001
                    response.failure(f"download broken: {error!r}")
                    record.download_ok = False
                else:
                    content_type = response.headers.get("content-type", "")
                    ok = size > 0 and (not content_type.startswith("video/mp4") or head[4:8] == b"ftyp")
                    record.download_ok = ok
                    response.success() if ok else response.failure("not an MP4")
            else:
                record.download_ok = False
                response.failure(f"HTTP {status}")
        record.download_bytes = size
        record.download_s = time.perf_counter() - start


class PollUser(_ApiUser):
    """A status-poll storm client: GETs of known jobs, job lists and short SSE reads."""

    wait_time = constant(0)
    weight = 1

    @task
    def poll(self) -> None:
        state = self.state
        storm = state.profile.poll_storm
        if storm is None or state.stopping or state.t0_mono is None or not state.in_window:
            gevent.sleep(0.5)
            return
        started = time.monotonic()
        roll = state.rng.random()
        tenants = [t.name for t in state.profile.tenants]
        if roll < storm.list_fraction or not state.known_jobs:
            tenant = state.rng.choice(tenants)
            self.client.get("/v1/videos?limit=20", headers=self._auth(tenant), name="GET /v1/videos",
                            timeout=state.profile.request_timeout, context={"tenant": tenant})
        else:
            tenant, job_id = state.rng.choice(state.known_jobs)
            if roll < storm.list_fraction + storm.events_fraction:
                self._peek_events(tenant, job_id)
            else:
                self.client.get(f"/v1/videos/{job_id}", headers=self._auth(tenant), name="GET /v1/videos/{id} (storm)",
                                timeout=state.profile.request_timeout, context={"tenant": tenant})
        pause = 1.0 / storm.rate_per_user - (time.monotonic() - started)
        if pause > 0:
            gevent.sleep(pause)

    def _peek_events(self, tenant: str, job_id: str) -> None:
        with self.client.get(f"/v1/videos/{job_id}/events", headers=self._auth(tenant), stream=True,
                             name="GET /v1/videos/{id}/events (storm)", catch_response=True,
                             timeout=self.state.profile.request_timeout, context={"tenant": tenant}) as response:
            if getattr(response, "status_code", 0) == 200:
                try:
                    next(iter_sse(response.iter_lines(decode_unicode=True)), None)
                    response.success()
                except Exception as error:  # noqa: BLE001
                    response.failure(f"SSE read failed: {error!r}")
                finally:
                    response.close()


class ProfileShape(LoadTestShape):
    """All job clients at once, the poll storm ramped linearly, and the run's stop condition."""

    def tick(self):
        state = state_of(self.runner.environment)
        state.start()
        if state.check_stop():
            return None
        profile = state.profile
        users = profile.concurrency
        classes = [JobUser]
        storm = profile.poll_storm
        if storm is not None:
            ramp = max(storm.ramp, 1e-9)
            pollers = min(storm.users, max(1, math.ceil(storm.users * state.elapsed() / ramp)))
            users += pollers
            classes.append(PollUser)
        return users, 100.0, classes


# -- helpers --------------------------------------------------------------------------------------


def iter_sse(lines):
    """(event, data) pairs of a text/event-stream."""
    event, data = "message", []
    for line in lines:
        if line is None:
            continue
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        yield event, "\n".join(data)


def _error_code(response) -> str | None:
    try:
        return (response.json().get("error") or {}).get("code")
    except Exception:  # noqa: BLE001
        error = getattr(response, "error", None)
        return type(error).__name__ if error is not None else None


def _retry_after(response) -> float | None:
    headers = getattr(response, "headers", None) or {}
    value = headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
