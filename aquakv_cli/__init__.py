"""The ``aquakv`` command line, above both halves: the runtime (``aquakv``) and calibration (``pipeline``, ``flows``)
and the benchmarks. The runtime package never imports this one, calibration or the benchmarks."""
