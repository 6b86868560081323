"""Running a matrix: the runner and its jobs, the artifacts cells share, metric dispatch, the spine's outputs."""
