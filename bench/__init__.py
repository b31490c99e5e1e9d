"""fastppo's benchmarks: one ``bench_<op>.py`` per op, run by ``python -m bench`` (see __main__)."""
