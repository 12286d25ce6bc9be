"""The one worker loop every source shares: ack policy, retries, status events and job logs.

A source only knows how to fetch its data and write a file at the path it is given. The loop:
- announces ``write_start``, then lets the source write into a temporary name beside the final
  file, fsyncs and renames it, and only then acknowledges the job — so a job is never lost and a
  file never appears half-written under its final name;
- retries transient failures (connection refused, HTTP 5xx, a cut stream) with exponential
  back-off; after the budget, or at once for a permanent failure (a full disk is one:
  ``full_disk``), it removes the temporary file, announces ``write_rejected`` with the reason
  and rejects the job into the dead-letter queue;
- writes a human-readable log of every job into the run's log file;
- leaves a job it was stopped in the middle of unsettled, so the queue gives it to another
  worker (which rewrites the same file, as the job id and file name are the same).

Every file of the job (temporary file, output, lease, log) is opened through a confined handle
on its directory below the pgroup's ``raw/`` (``job_files``): a directory replaced by a symlink
after the request was accepted fails the job with the reason instead of redirecting its writes,
and a symlink planted at a file's name is never followed.

Jobs longer than RabbitMQ's delivery timeout are run once thanks to a job lease beside the
output file: see ``lease.py``. The consumer loop starts consuming again if its queue iterator
ends because the channel was closed (the delivery timeout closes it).

A job waiting for its data never holds back the jobs of its kind behind it. The worker keeps
up to ``prefetch`` deliveries of a kind in hand, each in its own task, but only ``at_work`` of
them (one by default: a detector job uses every core) do the heavy work at once: a job takes
one of its kind's *work slots* (``WorkSlot``) when its data is there — a source that waits for
data says so with ``Progress.ready()`` after the wait, the loop takes the slot before calling
any other source — and gives it back when the attempt ends (so a retry's back-off does not
hold it either). Why this and not giving a waiting job back to the queue: a requeued job loses
its place, costs a redelivery per look (RabbitMQ cannot delay a requeue), and its lease and
its status would flap between "queued" and "running"; a job kept in hand keeps its lease
(heartbeat: RabbitMQ's delivery timeout is handled as for any long job), its temporary file
and its truthful "waiting for pulse …" status. Memory stays bounded: at most ``prefetch`` jobs
of a kind are in hand (the queue's prefetch and a bound on the tasks), a waiting one costs a
poll of the pulse map now and then, and the broker refuses ranges too far ahead
(``buffers.horizon``), so a job does not wait for long.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from sf_daq_broker.bookkeeping.atomic import partial_name, partial_pattern
from sf_daq_broker.bookkeeping.confined import ConfinedDir, OutsideRaw
from sf_daq_broker.buffers.errors import BufferClientError
from sf_daq_broker.buffers.horizon import Waiting
from sf_daq_broker.cancellation import raise_if_cancelled, through_stops
from sf_daq_broker.jobs import Action, Job, SourceKind, StatusEvent
from sf_daq_broker.jungfrau.errors import ConversionError
from sf_daq_broker.transport import JobDelivery, Transport
from sf_daq_broker.transport.failures import failure_kind
from sf_daq_broker.workers.full_disk import full_disk_errno, full_disk_reason
from sf_daq_broker.workers.job_files import open_job_dir, open_output_dir
from sf_daq_broker.workers.lease import JobLease, LeaseLost, LeasePolicy, LeaseState
from sf_daq_broker.workers.report import CompletenessReport, beam_pulses

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    first_delay: float = 1.0
    factor: float = 2.0
    max_delay: float = 30.0

    def delay(self, attempt: int) -> float:
        """Pause after the ``attempt``-th failure (1-based)."""
        return float(min(self.max_delay, self.first_delay * self.factor ** (attempt - 1)))


class Progress:
    """``write_progress`` events, at most one per ``interval`` seconds (and the last one)."""

    def __init__(
        self,
        transport: Transport,
        job: Job,
        total: int,
        interval: float = 0.5,
        *,
        phase: str = "",
    ) -> None:
        self._transport = transport
        self._job = job
        self.total = total
        self._interval = interval
        self._last_sent = 0.0
        self.done = 0
        #: What the job is doing now (a job of several steps, e.g. a pedestal): the events'
        #: message says "{phase}: {done} of {total}".
        self.phase = phase
        #: The work slot of the job's current attempt (set by the loop; None: no limit).
        self.slot: WorkSlot | None = None
        self._parent: Progress | None = None

    def for_phase(self, phase: str, total: int) -> Progress:
        """Progress of one step of the job, announced as the job's progress."""
        step = Progress(self._transport, self._job, total, self._interval, phase=phase)
        step._parent = self
        return step

    async def ready(self) -> None:
        """The job's data is there: wait for one of its kind's work slots (see the module
        docstring), saying so if another job holds it. A source that waits for data calls this
        after the wait and before the heavy work; again is harmless."""
        if self._parent is not None:
            await self._parent.ready()
            return
        slot = self.slot
        if slot is None or slot.held:
            return
        if slot.busy():
            await self._transport.publish_status(
                StatusEvent.for_job(
                    Action.WRITE_PROGRESS,
                    self._job,
                    f"data ready; waiting for another {self._job.kind} job to finish writing",
                    done=self.done,
                    total=self.total,
                )
            )
        await slot.take()

    async def update(self, done: int, total: int | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = total
        now = time.monotonic()
        if now - self._last_sent < self._interval and done < self.total:
            return
        self._last_sent = now
        message = f"{done} of {self.total}"
        await self._transport.publish_status(
            StatusEvent.for_job(
                Action.WRITE_PROGRESS,
                self._job,
                f"{self.phase}: {message}" if self.phase else message,
                done=done,
                total=self.total,
            )
        )

    async def waiting(self, waiting: Waiting) -> None:
        """Say what the job waits for: a ``write_progress`` whose message is the waiting line
        (/run_status, daq_client --wait and broker_debugger show it) and
        ``details["waiting"]`` its figures."""
        await self._transport.publish_status(
            StatusEvent.for_job(
                Action.WRITE_PROGRESS,
                self._job,
                waiting.message(),
                done=self.done,
                total=self.total,
                waiting=waiting.to_json(),
            )
        )


class WorkSlot:
    """One attempt's claim on the work slots of its kind: taken once (``take``), given back
    once when the attempt ends (``give_back``), so a failing or stopped attempt never keeps
    one."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots = slots
        self.held = False

    def busy(self) -> bool:
        """Whether ``take`` would wait now."""
        return self._slots.locked()

    async def take(self) -> None:
        if not self.held:
            await self._slots.acquire()
            self.held = True

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self._slots.release()


class Source(abc.ABC):
    """What a source module implements: fetch the job's data and write it to ``target``."""

    kind: ClassVar[SourceKind]
    #: True if ``retrieve`` waits for its data and then calls ``progress.ready()`` before the
    #: heavy work (the wait does not hold a work slot); False: the loop takes the job's work
    #: slot before calling ``retrieve``.
    waits_for_data: ClassVar[bool] = False

    @abc.abstractmethod
    async def retrieve(
        self, job: Job, target: Path, progress: Progress, job_log: logging.Logger
    ) -> CompletenessReport:
        """Write the whole file at ``target`` (a temporary file the loop created and will
        publish; ``/proc/self/fd/N``, so open it by this name only, e.g. ``h5py.File(target,
        "w")``).

        Raise a ``BufferClientError``: its ``transient`` flag tells the loop whether a retry may
        cure it (HTTP 5xx, a cut stream) or not (data aged out, a corrupt stream). A
        ``ConversionError`` (a calibration file that does not fit) fails the job at once too, as
        does an ``OSError`` of a full disk (ENOSPC, EDQUOT; also as the cause of another error).
        """


def expected_total(job: Job) -> int:
    return int(beam_pulses(job.requested_start, job.requested_stop, job.rate_multiplicator).size)


def rejection_reason(job: Job, problem: str) -> str:
    """Which range (the user's, not the one widened for the edge pulses) and what happened
    (the problem names the buffer). A pedestal job has no range when it is queued: its problem
    says where it was."""
    if job.kind is SourceKind.PEDESTAL:
        return problem
    return f"pulses {job.requested_start}-{job.requested_stop}: {problem}"


def temporary_name(job: Job, lease: JobLease) -> str:
    """The name this delivery writes the job's file under before publishing it: its own, so
    that two deliveries of one job (a take-over) never touch each other's file."""
    return partial_name(Path(job.output_file).name, lease.token)


class _JobLog:
    """A logger writing to the run's log file of this source while the job runs.

    The file is opened (appending) through a confined handle on its directory: a symlink
    planted at the log's name is refused, and the worker's own log says so.
    """

    def __init__(self, job: Job) -> None:
        # One logger per job: two pgroups' runs of the same number must not share a log file.
        self.logger = logging.getLogger(f"sf_daq_broker.job.{job.job_id}")
        self.logger.setLevel(job.log_level)  # the request's run_log_level
        self._handler: logging.Handler | None = None
        log_file = Path(job.log_file)
        try:
            with open_job_dir(job, log_file.parent) as directory:
                stream = directory.open_append(log_file.name)
        except (OSError, OutsideRaw) as exc:
            log.warning("job log %s cannot be written: %s", job.log_file, exc)
            return
        self._handler = _ClosingStreamHandler(stream)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.logger.addHandler(self._handler)

    def close(self) -> None:
        if self._handler is not None:
            self.logger.removeHandler(self._handler)
            self._handler.close()


class _ClosingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg,unused-ignore]
    """A stream handler that owns its stream (a file opened through a confined handle)."""

    def close(self) -> None:
        try:
            self.flush()
            self.stream.close()
        finally:
            super().close()


def _announce(job: Job, redelivered: bool, job_log: logging.Logger) -> None:
    """The job log's first line: what is to be done."""
    again = ", delivered again" if redelivered else ""
    if job.kind is SourceKind.PEDESTAL:  # no run and no range yet: the source says more
        job_log.info("pedestal job of %s (%s)%s", ", ".join(job.names), job.pgroup, again)
        return
    job_log.info(
        "%s of run %d (%s): %d names, pulses %d-%d (requested %d-%d, rate 1/%d)%s",
        job.source,
        job.run_number,
        job.pgroup,
        len(job.names),
        job.start_pulse_id,
        job.stop_pulse_id,
        job.requested_start,
        job.requested_stop,
        job.rate_multiplicator,
        again,
    )


#: Deliveries of a kind a worker keeps in hand by default: the jobs waiting for their data or
#: for a work slot, and the ones at work (see the module docstring).
PREFETCH = 8


class _Hands:
    """The deliveries of one kind in hand, each handled in a task of its own; at most
    ``limit`` at once (the queue's prefetch bounds them too, but a consumer started again
    after its channel closed gets new ones while the old ones still run)."""

    def __init__(self, limit: int) -> None:
        self._room = asyncio.Semaphore(limit)
        self._tasks: set[asyncio.Task[None]] = set()
        #: Deliveries taken into hand so far.
        self.taken = 0

    async def room(self) -> None:
        """Wait until another delivery may be taken into hand."""
        await self._room.acquire()

    def unused(self) -> None:
        """The room waited for was not used (no delivery came)."""
        self._room.release()

    def start(self, work: Coroutine[Any, Any, None]) -> None:
        self.taken += 1
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._room.release()
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("the task of a job died: %r", exc, exc_info=exc)

    async def stop(self) -> None:
        """Stop every job in hand and wait until each has given its lease back (or settled)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Worker:
    def __init__(
        self,
        transport: Transport,
        sources: Sequence[Source],
        retry: RetryPolicy | None = None,
        prefetch: int = PREFETCH,
        lease: LeasePolicy | None = None,
        at_work: int = 1,
    ) -> None:
        """``prefetch``: jobs of a kind in hand at once (waiting for data, for a work slot, or
        at work); ``at_work``: jobs of a kind doing the heavy work at once."""
        self.transport = transport
        self.sources = list(sources)
        self.retry = retry or RetryPolicy()
        self.prefetch = max(1, prefetch)
        self.at_work = max(1, min(at_work, self.prefetch))
        self.lease = lease or LeasePolicy()
        self._slots: dict[SourceKind, asyncio.Semaphore] = {}

    async def run(self) -> None:
        """Consume the queue of every source until cancelled.

        A task group, not ``gather``: a cancelled ``gather`` returns as soon as its first child
        (an idle consumer) is cancelled, and the process could then exit while another
        consumer was still releasing an interrupted job's lease. The group returns only when
        every consumer has finished its clean-up.
        """
        async with asyncio.TaskGroup() as group:
            for source in self.sources:
                group.create_task(self._consume(source), name=f"consume-{source.kind.value}")

    async def _consume(self, source: Source) -> None:
        log.info("worker for %s jobs waiting on the %s transport", source.kind, self.transport.name)
        hands = _Hands(self.prefetch)
        failures = 0  # of the consumer in a row, without a delivery in between
        try:
            while True:
                taken = hands.taken
                try:
                    await self._consume_once(source, hands)
                except Exception as exc:
                    raise_if_cancelled()  # a stop whose closing of the consumer failed
                    # The consumer failed, e.g. RabbitMQ closed its channel by an RPC timeout
                    # while it recovered from an outage. A worker that gave up here would leave
                    # every later job of its kind waiting: it consumes again, backing off.
                    failures = 1 if hands.taken > taken else failures + 1
                    pause = _reconsume_pause(self.lease.reconsume_delay, failures)
                    log.warning(
                        "the %s consumer failed (%s); consuming again in %.3g s",
                        source.kind,
                        failure_kind(exc),
                        pause,
                    )
                else:
                    # The consumer's channel was closed (e.g. by RabbitMQ's delivery timeout
                    # while a long job ran): its unsettled jobs went back to the queue (the
                    # ones in hand go on, their leases keep them from running twice).
                    failures, pause = 0, self.lease.reconsume_delay
                    log.warning("the %s consumer ended; consuming again", source.kind)
                await asyncio.sleep(pause)
        finally:
            await hands.stop()

    async def _consume_once(self, source: Source, hands: _Hands) -> None:
        """Take deliveries into hand until the consumer ends (its channel was closed)."""
        consumer = self.transport.consume_jobs(source.kind, self.prefetch)
        # The next delivery is awaited in a task of its own (shielded): a stop must not reach
        # the consumer while jobs in hand still settle, or it would close the consumer first
        # and give their deliveries back to the queue under them.
        pull: asyncio.Task[JobDelivery] | None = None
        try:
            while True:
                await hands.room()
                pull = asyncio.create_task(_next(consumer))
                try:
                    delivery = await asyncio.shield(pull)
                except BaseException:  # StopAsyncIteration (the consumer ended) included
                    hands.unused()
                    raise
                hands.start(self.handle(source, delivery))
        except StopAsyncIteration:
            return
        except Exception:
            raise  # the consumer failed: the jobs in hand go on (``_consume`` consumes again)
        except BaseException:
            # Stopped: the jobs in hand give their leases back (or finish settling) before
            # the consumer gives the unsettled ones back to the queue.
            await hands.stop()
            raise
        finally:
            await _close_consumer(consumer, pull)

    def _slot(self, kind: SourceKind) -> WorkSlot:
        if kind not in self._slots:
            self._slots[kind] = asyncio.Semaphore(self.at_work)
        return WorkSlot(self._slots[kind])

    async def handle(self, source: Source, delivery: JobDelivery) -> None:
        job = delivery.job
        job_log = _JobLog(job)
        try:
            await self._handle(source, delivery, job_log.logger)
        except Exception as exc:
            # Around the job itself (e.g. its lease cannot be created: the output directory is
            # gone, not writable or full). The worker must go on with the next job, and this
            # one must not wait unsettled at the head of the queue.
            job_log.logger.exception("cannot work on this job")
            await self._reject_unrunnable(delivery, job_log.logger, exc)
        finally:
            job_log.close()

    async def _handle(self, source: Source, delivery: JobDelivery, job_log: logging.Logger) -> None:
        job = delivery.job
        _announce(job, delivery.redelivered, job_log)
        directory = await asyncio.to_thread(open_output_dir, job)
        try:
            await self._lease_and_run(
                source, delivery, JobLease(job, self.lease, directory), job_log
            )
        finally:
            # Settling (which removes the lease through this handle) is over by now, even if
            # the worker was stopped meanwhile: see ``_surely``.
            directory.close()

    async def _lease_and_run(
        self, source: Source, delivery: JobDelivery, lease: JobLease, job_log: logging.Logger
    ) -> None:
        settled = await self._acquire(lease, delivery, job_log)
        if settled:
            return
        outcome = await self._work(source, delivery, lease, job_log)
        if outcome is None:
            return
        # The file is published (or the job failed): a stop signal now waits until the
        # outcome is in the lease, announced and the delivery settled.
        try:
            if isinstance(outcome, str):
                await self._surely(self._fail(delivery, lease, job_log, outcome), job_log)
            else:
                await self._surely(self._finish(delivery, lease, outcome, job_log), job_log)
        except LeaseLost as exc:
            job_log.error("%s: stopped, the other delivery writes the file", exc)

    async def _work(
        self, source: Source, delivery: JobDelivery, lease: JobLease, job_log: logging.Logger
    ) -> CompletenessReport | str | None:
        """The job's work (``_run``) under its lease's heartbeat: the report of the published
        file, the reason the job failed, or None if the lease was lost (another delivery
        runs the job). The work runs in its own task so that the heartbeat can stop it alone;
        the heartbeat ends with the work, as the lease's state is about to be settled."""
        job_task = asyncio.create_task(self._run(source, delivery, lease, job_log))
        heartbeat = asyncio.create_task(self._heartbeat(lease, job_task, job_log))
        try:
            return await job_task
        except LeaseLost as exc:
            job_log.error("%s: stopped, the other delivery writes the file", exc)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the worker is being stopped
            job_log.error("lease lost: stopped, the other delivery writes the file")
        finally:
            heartbeat.cancel()
            await asyncio.wait([heartbeat])  # a stop of this task still comes through
        return None

    async def _acquire(
        self, lease: JobLease, delivery: JobDelivery, job_log: logging.Logger
    ) -> bool:
        """Take the job's lease, waiting while another delivery of it runs.

        Returns True if the job turned out to be settled by that other delivery (this one was
        acknowledged or dead-lettered accordingly), False when the lease is ours to run.
        """
        waiting = False
        while True:
            record = await asyncio.to_thread(lease.read)
            if record is None and waiting:
                # A lease goes only once its job is acknowledged (a stopped worker releases
                # it instead): the delivery we waited for finished, this one is a duplicate.
                job_log.info("written and acknowledged by the other delivery: acknowledged")
                await self._surely(
                    self._settle(delivery, lease, ack=True, remove=False, job_log=job_log), job_log
                )
                return True
            if record is None:
                if await asyncio.to_thread(lease.try_create):
                    return False
                continue  # created by another delivery in between: look at it
            if record.state is LeaseState.FINISHED and Path(lease.job.output_file).exists():
                job_log.info("already written by an earlier delivery: acknowledged")
                # Again, in case that delivery's own event was lost (the store keeps its report).
                await self._announce_again(
                    Action.WRITE_FINISHED, lease.job, "written by an earlier delivery", job_log
                )
                await self._surely(
                    self._settle(delivery, lease, ack=True, remove=True, job_log=job_log), job_log
                )
                return True
            if record.state is LeaseState.FAILED:
                job_log.info("failed in an earlier delivery (%s): rejected", record.reason)
                await self._announce_again(Action.WRITE_REJECTED, lease.job, record.reason, job_log)
                await self._surely(
                    self._settle(delivery, lease, ack=False, remove=True, job_log=job_log), job_log
                )
                return True
            if (
                record.state is LeaseState.RUNNING
                and record.age < self.lease.stale_after
                and not JobLease.owner_is_gone(record.owner)
            ):
                if not waiting:
                    job_log.info(
                        "running in another delivery (%s); waiting for it to finish", record.owner
                    )
                    waiting = True
                await asyncio.sleep(self.lease.poll)
                continue
            # Released by a stopped worker, stale (its worker died), or finished but the file
            # is gone.
            job_log.log(
                logging.INFO if record.state is LeaseState.RELEASED else logging.WARNING,
                "taking over the job from %s (lease %s, %.0f s old)",
                record.owner,
                record.state,
                record.age,
            )
            if await asyncio.to_thread(lease.try_take_over, record):
                return False

    async def _heartbeat(
        self, lease: JobLease, job_task: asyncio.Task[Any], job_log: logging.Logger
    ) -> None:
        while True:
            await asyncio.sleep(self.lease.heartbeat)
            try:
                await asyncio.to_thread(lease.touch)
            except LeaseLost as exc:
                job_log.error("%s", exc)
                job_task.cancel(msg="lease lost")
                return
            except OSError as exc:  # a file system hiccup: the next beat may succeed
                job_log.warning("lease heartbeat failed: %s", exc)

    async def _run(
        self, source: Source, delivery: JobDelivery, lease: JobLease, job_log: logging.Logger
    ) -> CompletenessReport | str:
        """Write and publish the job's file: its report, or why the job failed."""
        job = delivery.job
        final_name = Path(job.output_file).name
        temp_name = temporary_name(job, lease)
        await asyncio.to_thread(_remove_leftovers, lease.directory, final_name, temp_name)
        total = expected_total(job)
        await self.transport.publish_status(
            StatusEvent.for_job(Action.WRITE_START, job, "started", total=total)
        )
        progress = Progress(self.transport, job, total)
        try:
            return await self._attempts(source, lease, progress, job_log)
        except asyncio.CancelledError:
            # Stopped (SIGTERM) or the lease was lost; the temporary file (ours alone, whoever
            # owns the lease now) was removed on leaving its ``with``.
            if await asyncio.to_thread(lease.owned):
                await asyncio.to_thread(lease.settle, LeaseState.RELEASED)
                job_log.warning(
                    "worker stopped in the middle: lease released, the job is left unsettled "
                    "for its queue to deliver again"
                )
            raise

    async def _attempts(
        self, source: Source, lease: JobLease, progress: Progress, job_log: logging.Logger
    ) -> CompletenessReport | str:
        """Try until the file is published (its report) or the job fails (the reason)."""
        attempt = 0
        while True:
            raise_if_cancelled()  # a library may have swallowed a stop (``cancellation``)
            attempt += 1
            try:
                return await self._attempt(source, lease, progress, job_log)
            except LeaseLost:
                raise
            except Exception as exc:
                verdict = await self._judge(exc, attempt, lease, job_log)
            if isinstance(verdict, str):
                return verdict
            await asyncio.sleep(verdict)

    async def _attempt(
        self, source: Source, lease: JobLease, progress: Progress, job_log: logging.Logger
    ) -> CompletenessReport:
        """One try: the source writes the temporary file, which is then published. The try
        holds a work slot of its kind from when its data is ready to its end."""
        job = lease.job
        slot = progress.slot = self._slot(source.kind)
        try:
            if not source.waits_for_data:
                await progress.ready()
            temp_name = temporary_name(job, lease)
            with await asyncio.to_thread(lease.directory.new_file, temp_name) as temp:
                try:
                    report = await source.retrieve(job, temp.path, progress, job_log)
                except Exception:
                    # A temporary file replaced under the source explains its failure.
                    await asyncio.to_thread(temp.check)
                    raise
                if not await asyncio.to_thread(lease.owned):
                    raise LeaseLost(f"the lease {lease.path} was taken over")
                await asyncio.to_thread(temp.publish, Path(job.output_file).name)
            return report
        finally:
            slot.give_back()

    async def _judge(
        self, exc: Exception, attempt: int, lease: JobLease, job_log: logging.Logger
    ) -> float | str:
        """After the ``attempt``-th try failed with ``exc``: the pause before the next try,
        or why the job fails (at once for a full disk: ``full_disk`` says why)."""
        if code := full_disk_errno(exc):
            return full_disk_reason(lease.job, code)
        if isinstance(exc, BufferClientError):
            if not exc.transient:
                return str(exc)
            if attempt >= self.retry.attempts:
                return f"{exc} (gave up after {attempt} tries)"
            pause = self.retry.delay(attempt)
            job_log.warning("try %d failed: %s; next try in %.1f s", attempt, exc, pause)
            return pause
        if isinstance(exc, ConversionError | OutsideRaw):
            return str(exc)
        if not await asyncio.to_thread(lease.owned):
            raise LeaseLost(f"the lease {lease.path} was taken over") from exc
        job_log.error("unexpected error", exc_info=exc)
        return f"unexpected error: {exc!r}"

    async def _finish(
        self,
        delivery: JobDelivery,
        lease: JobLease,
        report: CompletenessReport,
        job_log: logging.Logger,
    ) -> None:
        """The file is published: record it in the lease, say so, acknowledge."""
        job = delivery.job
        if not await asyncio.to_thread(lease.owned):
            raise LeaseLost(f"the lease {lease.path} was taken over while the file was published")
        await asyncio.to_thread(lease.settle, LeaseState.FINISHED)
        for line in report.lines():
            job_log.info("  %s", line)
        job_log.info("written %s: %s", job.output_file, report.summary())
        total = expected_total(job)
        await self.transport.publish_status(
            StatusEvent.for_job(
                Action.WRITE_FINISHED, job, report.summary(), total=total, report=report.to_json()
            )
        )
        await self._settle(delivery, lease, ack=True, remove=True, job_log=job_log)

    async def _fail(
        self, delivery: JobDelivery, lease: JobLease, job_log: logging.Logger, reason: str
    ) -> None:
        job = delivery.job
        if not await asyncio.to_thread(lease.owned):
            # Taken over: the job is the new owner's now, its outcome is not ours to record.
            raise LeaseLost(f"the lease {lease.path} was taken over")
        reason = rejection_reason(job, reason)
        try:
            await asyncio.to_thread(lease.settle, LeaseState.FAILED, reason)
        except OSError as exc:
            # E.g. a disk still full. The record is only for a later delivery of the job; this
            # one is rejected now, and the lease removed once it is, so that the job neither
            # stays ``running`` nor leaves its lease behind. (If the rejection fails too, the
            # lease goes stale and the job's next delivery takes it over.)
            job_log.warning(
                "the failure could not be recorded in the lease %s (%s); the job is rejected "
                "all the same",
                lease.path,
                exc,
            )
        job_log.error("failed, no file written: %s", reason)
        await self.transport.publish_status(StatusEvent.for_job(Action.WRITE_REJECTED, job, reason))
        await self._settle(delivery, lease, ack=False, remove=True, job_log=job_log)

    async def _announce_again(
        self, action: Action, job: Job, message: str, job_log: logging.Logger
    ) -> None:
        """Best effort: the job's outcome is settled already, a lost event must not undo it."""
        try:
            await self.transport.publish_status(StatusEvent.for_job(action, job, message))
        except Exception as exc:
            job_log.warning("the %s event could not be published again: %r", action, exc)

    async def _reject_unrunnable(
        self, delivery: JobDelivery, job_log: logging.Logger, problem: Exception
    ) -> None:
        """Dead-letter a job that cannot even be started here, saying why (what to do, for a
        full disk)."""
        job = delivery.job
        code = full_disk_errno(problem)
        why = full_disk_reason(job, code) if code else f"cannot work on it: {problem}"
        reason = rejection_reason(job, why)
        job_log.error("failed, no file written: %s", reason)
        with contextlib.suppress(Exception):
            await self.transport.publish_status(
                StatusEvent.for_job(Action.WRITE_REJECTED, job, reason)
            )
        with contextlib.suppress(Exception):
            await delivery.reject()

    async def _surely(self, work: Coroutine[Any, Any, None], job_log: logging.Logger) -> None:
        """Run ``work`` (settling the job) to its end even if the worker is stopped meanwhile:
        a job acknowledged must not keep its lease, nor a finished lease miss its event and
        ack. ``work`` runs in a task of its own; a stop that comes meanwhile waits for it to
        end and is raised afterwards, so that the caller's handle on the job's directory
        (through which the lease is removed) is not closed under it, and the consumer does
        not give the delivery back to the queue before it is settled."""
        settling, stopped = await through_stops(
            work,
            lambda: job_log.warning("stopped while the job was being settled: settling it first"),
        )
        if stopped is not None:
            if not settling.cancelled():
                settling.exception()  # looked at: the stop is what the caller hears
            raise stopped
        settling.result()

    async def _settle(
        self,
        delivery: JobDelivery,
        lease: JobLease,
        *,
        ack: bool,
        remove: bool,
        job_log: logging.Logger,
    ) -> None:
        """Ack or reject, then (``remove``) drop the settled lease. If the delivery is dead
        (channel closed by the delivery timeout) the lease stays, so that the job's next
        delivery settles the job the same way."""
        try:
            if ack:
                await delivery.ack()
            else:
                await delivery.reject()
        except Exception as exc:
            job_log.warning(
                "this delivery can no longer be settled (%s: %s), probably closed by the "
                "queue's delivery timeout; the job's next delivery will be %s from the lease",
                type(exc).__name__,
                exc,
                "acknowledged" if ack else "rejected",
            )
            return
        if remove:
            await asyncio.to_thread(lease.remove_settled)


#: The longest pause between two tries of a consumer that keeps failing.
MAX_RECONSUME_PAUSE = 10.0


def _reconsume_pause(first: float, failures: int) -> float:
    """Doubles with each failure in a row, up to ``MAX_RECONSUME_PAUSE``: a RabbitMQ that is
    away is not hammered, and one that is back is used again within seconds."""
    doubled: float = first * 2.0 ** (failures - 1)
    return min(doubled, max(first, MAX_RECONSUME_PAUSE))


async def _next(consumer: AsyncIterator[JobDelivery]) -> JobDelivery:
    return await anext(consumer)


async def _close_consumer(
    consumer: AsyncGenerator[JobDelivery, None], pull: asyncio.Task[JobDelivery] | None
) -> None:
    """Stop waiting for a delivery, then close the consumer (its unsettled deliveries go back
    to the queue)."""
    if pull is not None and not pull.done():
        pull.cancel()
        await asyncio.wait([pull])
    await consumer.aclose()


def _remove_leftovers(directory: ConfinedDir, final_name: str, keep: str) -> None:
    """Temporary files of the job written by deliveries that died or lost the lease."""
    for name in directory.names(partial_pattern(final_name)):
        if name != keep:
            directory.unlink(name)
