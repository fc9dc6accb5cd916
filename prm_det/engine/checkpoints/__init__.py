"""Checkpoints, in one place: reading them as data (:mod:`.reading`,
remote ones :mod:`.remote`, switched on for mmengine by
:mod:`.safe_loading`), writing them so that a kill loses nothing
(:mod:`.writing`), and choosing the one to resume from (:mod:`.resume`)."""
