"""Fleet soak: many vLLM-like server processes, one node cache, one bucket, faults on.

See `devtools.soak.driver` for the run, `devtools.soak.worker` for one server process and
`devtools.soak.report` for the checks. ``python -m devtools.soak --help`` for the options.
"""
