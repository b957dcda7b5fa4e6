"""Calibration, in the order a run goes: ``sources`` / ``inputs`` / ``data`` (model, texts, tokens) -> ``checkpoint``
/ ``collect`` (K/V per layer into ``activations.zarr``) -> fit (``chain``: the shard protocol and its one driver;
``staged``: Zarr-backed shards; ``resident``: device-resident shards that also collect; ``stats``: their row-batch
statistics; ``solve``: the math from statistics to codecs; ``store``: stores and saved codecs; ``fit``: the stage on
collected activations, ``budget``: bit allocation) -> ``validate`` -> ``publish``; ``testing``: tiny models for
tests."""
