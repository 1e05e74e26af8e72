"""What stops a benchmark run before it measures anything (a reference that cannot be rebuilt, bad
arguments); the CLI prints it as one line and exits 2."""


class BenchError(Exception):
    pass
