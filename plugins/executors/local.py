"""The default executor: every pending cell in this process, one model at a time, the artifact graph walked in
order (M's cells, then each compression's, one hook at a time); an M_c's weights are dropped once its cells
are scored."""

from __future__ import annotations

from collections.abc import Callable

from saex import Executor, Job, NoParams, hookimpl


class Local:
    name = "local"
    description = "compute every cell in this process (the default)"
    Params = NoParams

    def execute(self, job: Job, params: NoParams) -> None:
        for model in job.models():
            session = job.runner.open_model(job.matrix, model, job.device)
            groups = job.groups(model)
            for index, (compression, cells) in enumerate(groups):
                job.runner.score(session, cells)
                if compression is not None and all(c != compression for c, _ in groups[index + 1 :]):
                    session.release(compression)


@hookimpl
def register_executors(register: Callable[[Executor], None]) -> None:
    register(Local())
