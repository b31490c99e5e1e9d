"""The repository's shim for ``python -m bench``: the benchmarks live in ``fastppo.bench``
(``fastppo bench``); run from here, their results default to this folder's ``results/``."""
