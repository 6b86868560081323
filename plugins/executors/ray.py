"""Ray executor: a matrix's artifact graph as Ray tasks, for matrices that outgrow one machine.

Per model, one task computes what M's cells need (M's activations, the original SAEs); per compression, one
task depending on it computes M_c (compress, verify), its activations, and the retrained and pruned SAEs;
then one scoring task per (scored model, hook) runs as soon as its artifacts exist. Every shared artifact is
computed once: tasks find each other's results in the cache (which must be a directory every worker reaches,
``$SAEX_HOME/cache``) and wait on its per-artifact locks, and cells are claimed in the results store. Each
task asks for ``cpus_per_task`` CPUs and, where CUDA is present, ``gpus_per_task`` GPUs.

Workers rebuild the run from what the driver passes (registry files, store and cache paths, device), so
plugins must be installed on every worker; metrics equal a ``local`` run's bit for bit at the same number of
torch threads (tests/run/test_ray.py).
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from saex import Executor, Job, hookimpl, worker_step


class RayParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="cluster to join (e.g. 'auto', 'ray://head:10001'); none: start one")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of a local instance started for the run")
    cpus_per_task: float = Field(1.0, gt=0)
    gpus_per_task: float = Field(1.0, ge=0, description="GPUs per task where CUDA is present (else 0)")


class Ray:
    name = "ray"
    description = "the matrix's artifact graph as Ray tasks (a cluster by address, or a local instance)"
    Params = RayParams

    def execute(self, job: Job, params: RayParams) -> None:
        import ray

        started = not ray.is_initialized()
        if started:
            ray.init(address=params.address, num_cpus=params.num_cpus, include_dashboard=False, log_to_driver=False)
        try:
            self._run_graph(ray, job, params)
        finally:
            if started:
                ray.shutdown()

    def _run_graph(self, ray, job: Job, params: RayParams) -> None:
        spec = job.worker_spec()
        gpus = params.gpus_per_task if job.device.type == "cuda" else 0
        step = ray.remote(num_cpus=params.cpus_per_task, num_gpus=gpus)(worker_step)
        scores = []
        for model in job.models():
            groups = job.groups(model)
            base = step.remote(spec, model, None, None)
            prepared = {None: base}
            for compression in dict.fromkeys(c for c, _ in groups if c is not None):
                prepared[compression] = step.remote(spec, model, compression, None, base)
            for compression, cells in groups:
                scores.append(step.remote(spec, model, compression, cells[0].hook, prepared[compression]))
        for done in ray.get(scores):
            job.runner.log(f"ray: scored {done}")


@hookimpl
def register_executors(register: Callable[[Executor], None]) -> None:
    register(Ray())
