"""Ray executor: a matrix's artifact graph as Ray tasks, for matrices that outgrow one machine.

Per model, one task computes what M's cells need (M's activations, the original SAEs); per compression, one
task depending on it computes M_c (compress, verify), its activations, and the retrained and pruned SAEs;
then one scoring task per (scored model, hook) runs as soon as its artifacts exist, and its cells are printed
as it finishes. Every shared artifact is computed once: tasks find each other's results in the cache (which
must be a directory every worker reaches, ``$SAEX_HOME/cache``) and wait on its per-artifact locks, and cells
are claimed in the results store in the driver's name. Each task asks for ``cpus_per_task`` CPUs and, where
CUDA is present, ``gpus_per_task`` GPUs.

Without an ``address`` the executor starts a local instance of its own (``address="local"``: never one that an
earlier ``ray start`` recorded, nor ``RAY_ADDRESS``); with one it joins that cluster, checked to answer first,
and passes no local resource counts. Workers rebuild the run from what the driver passes (registry files, store
and cache paths, device) and see the driver's ``WORKER_ENV`` variables (Ray's ``runtime_env``), so plugins
must be installed on every worker; metrics equal a ``local`` run's bit for bit at the same number of torch
threads (tests/run/test_ray.py). Ctrl-C stops the tasks, keeps every finished cell and gives back the claims
of the rest for the next run.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from pydantic import BaseModel, ConfigDict, Field, model_validator

from saex import Executor, ExecutorError, Job, hookimpl, worker_step

# What the workers need from the driver's environment (a cluster's workers have their own, not the driver's).
WORKER_ENV = ("SAEX_HOME", "SAEX_PLUGINS", "SAEX_DISABLE_PLUGINS", "OMP_NUM_THREADS")
CONNECT_SECONDS = 5.0  # to open a TCP connection to the cluster before Ray is asked (its own retries take minutes)
CLIENT_PORT = 10001  # Ray Client's default, for a ray:// address without one
# Ray's attempts (about a second apart; 20 by default) to join a cluster that accepts connections but not this driver
GCS_RETRIES, CONNECT_RETRIES = "RAY_gcs_server_port_wait_time_s", 5
LOCAL = (None, "local")
STOPPED = {  # the error of a cell released unfinished, by whether Ctrl-C stopped the run
    True: "interrupted before it finished; the next run computes it",
    False: "the run stopped on a task's error before this cell finished; the next run computes it",
}


class RayParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(
        None, description="cluster to join (e.g. 'auto', 'head:6379', 'ray://head:10001'); none or 'local': start one"
    )
    num_cpus: int | None = Field(None, gt=0, description="CPUs of a local instance started for the run")
    cpus_per_task: float = Field(1.0, gt=0)
    gpus_per_task: float = Field(1.0, ge=0, description="GPUs per task where CUDA is present (else 0)")

    @model_validator(mode="after")
    def _resources_of_a_local_instance(self) -> RayParams:
        if self.num_cpus is not None and self.address not in LOCAL:
            raise ValueError("num_cpus sizes a local instance; a cluster has its own CPUs: drop num_cpus or address")
        return self


class Ray:
    name = "ray"
    description = "the matrix's artifact graph as Ray tasks (a cluster by address, or a local instance)"
    Params = RayParams

    def execute(self, job: Job, params: RayParams) -> None:
        import ray

        started = not ray.is_initialized()
        if started:
            _connect(ray, params)
        submitted: list = []
        complete = interrupted = False
        try:
            self._run_graph(ray, job, params, submitted)
            complete = True
        except KeyboardInterrupt:
            interrupted = True
        finally:
            with _sigint_deferred() as late:  # the clean-up runs to its end, whatever Ctrl-C is pressed again
                if started:
                    ray.shutdown()  # stops this run's workers (a local instance: all of it)
                elif not complete:  # someone else's connection stays open: stop this run's tasks
                    for ref in submitted:
                        _cancel(ray, ref)
                # only now, with no worker of this run left to write: the next run computes what they held
                released = 0 if complete else job.release(STOPPED[interrupted])
        if interrupted or late:
            raise KeyboardInterrupt(f"{job.done()} cells done are kept, {released} released for the next run")

    def _run_graph(self, ray, job: Job, params: RayParams, submitted: list) -> None:
        spec = job.worker_spec()
        gpus = params.gpus_per_task if job.device.type == "cuda" else 0
        step = ray.remote(num_cpus=params.cpus_per_task, num_gpus=gpus)(worker_step)
        scores = []
        for model in job.models():
            groups = job.groups(model)
            base = step.remote(spec, model, None, None)
            prepared = {None: base}
            submitted.append(base)
            for compression in dict.fromkeys(c for c, _ in groups if c is not None):
                prepared[compression] = step.remote(spec, model, compression, None, base)
                submitted.append(prepared[compression])
            for compression, cells in groups:
                scores.append(step.remote(spec, model, compression, cells[0].hook, prepared[compression]))
                submitted.append(scores[-1])
        failed = None
        while scores:
            ready, scores = ray.wait(scores, num_returns=1)
            try:
                lines = ray.get(ready[0])
            except ray.exceptions.RayError as exc:  # the other groups go on; the first error is raised at the end
                failed = failed or exc
                continue
            for line in lines:
                job.runner.log(line)
        if failed is not None:
            raise _cause(failed)


def _connect(ray, params: RayParams) -> None:
    """A local instance of the run's own, or the cluster at ``params.address`` (exit 2 when it does not answer)."""
    env = worker_env()
    common = {
        "log_to_driver": False,
        "logging_level": logging.WARNING,
        "runtime_env": {"env_vars": env} if env else None,
    }
    if params.address in LOCAL:
        # held Ctrl-C: a half-started instance would outlive the run; quiet: Ray's notice that it turned token
        # authentication on for the instance (its default) is no news for a run
        with _sigint_deferred() as late, _quiet("ray._private.authentication"):
            ray.init(address="local", num_cpus=params.num_cpus, include_dashboard=False, **common)
        if late:
            ray.shutdown()
            raise KeyboardInterrupt("nothing was computed yet")
        return
    target = _answering(params.address)
    ours = GCS_RETRIES not in os.environ  # a value of the user's is theirs to keep
    if ours:
        os.environ[GCS_RETRIES] = str(CONNECT_RETRIES)
    try:
        ray.init(address=params.address, **common)
    except (ConnectionError, RuntimeError, ray.exceptions.RayError) as exc:
        raise ExecutorError(_unreachable(params.address, target, _reason(exc))) from None
    finally:
        if ours:
            os.environ.pop(GCS_RETRIES, None)


def worker_env() -> dict[str, str]:
    """The driver's ``WORKER_ENV`` variables that are set, for the workers' environment (``SAEX_HOME`` made
    absolute: workers do not start in the driver's folder)."""
    env = {name: os.environ[name] for name in WORKER_ENV if os.environ.get(name)}
    if "SAEX_HOME" in env:
        env["SAEX_HOME"] = os.path.abspath(env["SAEX_HOME"])
    return env


def _answering(address: str) -> str:
    """The host:port Ray connects to for ``address`` (resolved as Ray does: ``auto`` is ``RAY_ADDRESS`` or the
    last ``ray start`` here), once a TCP connection to it opened within ``CONNECT_SECONDS``; else ExecutorError."""
    from ray._private.services import canonicalize_bootstrap_address

    target = None
    try:
        chosen = (os.environ.get("RAY_ADDRESS") or address) if address == "auto" else address
        if "://" in chosen:
            target = chosen.split("://", 1)[1].rstrip("/")
            target = target if ":" in target else f"{target}:{CLIENT_PORT}"
        else:
            target = canonicalize_bootstrap_address(chosen) or chosen
        host, _, port = target.rpartition(":")
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS):
            return target
    except (OSError, ValueError) as exc:  # refused, unreachable, timed out, no cluster found for 'auto', bad form
        raise ExecutorError(_unreachable(address, target, _reason(exc))) from None


def _unreachable(address: str, target: str | None, reason: str) -> str:
    at = f"{address} ({target})" if target and target != address else address
    return (
        f"ray: cannot join the Ray cluster at {at}: {reason}. Check that the cluster runs (`ray status` on its head "
        "node), that this machine reaches that host and port, and, where the cluster requires a token, that "
        "RAY_AUTH_TOKEN or ~/.ray/auth_token holds it (without an address, saex starts a local instance)"
    )


def _reason(exc: BaseException) -> str:
    """What went wrong, in one line: the socket's error, the token refused, or Ray's first line."""
    from ray.exceptions import AuthenticationError

    chain = f"{exc} {exc.__cause__ or ''}"
    if "Unauthenticated" in chain or "InvalidAuthToken" in chain or isinstance(exc, AuthenticationError):
        return "the cluster refused this machine's authentication token (or its lack of one)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200].rstrip(".")


def _cancel(ray, ref) -> None:
    """Stop a task of an interrupted run (not forced: Ray 2.60's driver can abort on a forced cancel racing the
    task's end); one finished already has nothing left to stop."""
    with suppress(Exception):
        ray.cancel(ref)


def _cause(exc: Exception) -> Exception:
    """The error a task raised, as the driver would have raised it (bad input stays exit 2), with the worker's
    traceback as a note; Ray's own errors (a worker that died, ...) as they are."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, Exception):
        cause.add_note(f"raised in a Ray task:\n{getattr(exc, 'traceback_str', '')}")
        return cause
    return exc


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Only errors from ``logger`` while the block runs."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class _Signalled:
    def __init__(self) -> None:
        self.seen = False

    def __bool__(self) -> bool:
        return self.seen


@contextmanager
def _sigint_deferred() -> Iterator[_Signalled]:
    """Hold Ctrl-C while the block runs (true when one came); outside the main thread, nothing to hold."""
    late = _Signalled()

    def note(signum: int, frame: object) -> None:
        late.seen = True

    try:
        previous = signal.signal(signal.SIGINT, note)
    except ValueError:  # not the main thread: signals go to the main thread anyway
        yield late
        return
    try:
        yield late
    finally:
        signal.signal(signal.SIGINT, previous)


@hookimpl
def register_executors(register: Callable[[Executor], None]) -> None:
    register(Ray())
