"""The slot runner: the process that lives inside one slot's sandbox and runs its tools.

It runs as `python -S -I` (no site-packages) inside bubblewrap, so it imports the standard library,
its own modules and the standard-library-only ground modules (`atropos.host`, `atropos.units`)
and nothing else; `tests/test_runner_imports.py` fails when it does. This `__init__` imports
nothing, so that importing the runner loads only what it uses.
"""
