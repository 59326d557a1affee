"""Speed benchmarks, each a command that prints one JSON line (see the README's numbers).

- ``cabs-bench-selection`` (:mod:`.selection`): milliseconds per global selection of each policy
  on a realistic superbatch.
- ``cabs-bench-pipeline`` (:mod:`.pipeline`): trained samples per second delivered by the input
  pipeline, IID against deferred decoding against decoding the whole superbatch.
- ``cabs-bench-tagging`` (:mod:`.tagging`): captions tagged per second on one core.

The long-tail *quality* benchmark (does CABS train better models) is
:mod:`cabs_streaming.benchmark`.
"""
