"""The command lines: each module's ``main(argv) -> exit status`` is a ``[project.scripts]`` entry.

``cabs-convert`` (:mod:`.convert`), ``cabs-tag`` (:mod:`.tag`), ``cabs-report`` (:mod:`.report`);
the scripts in ``tools/`` call the same functions. Every module here parses arguments before it
imports anything heavy, so ``--help`` is instant.
"""
