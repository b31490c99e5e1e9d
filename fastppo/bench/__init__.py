"""fastppo's benchmarks: one ``bench_<op>.py`` per op, run by ``fastppo bench`` (``run.main``), which
writes its results where ``--output`` says (default ``./bench-results``)."""
