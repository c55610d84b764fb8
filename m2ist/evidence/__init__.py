"""The evidence: what proves the library, kept apart from it.

The procedural REC benchmark (:mod:`~m2ist.evidence.synthetic`), the offline demo towers
(:mod:`~m2ist.evidence.demo_towers`), ``m2ist demo`` (:mod:`~m2ist.evidence.demo`), ``m2ist compare``
(:mod:`~m2ist.evidence.compare`), ``m2ist bench`` (:mod:`~m2ist.evidence.bench`), the head ablation
(:mod:`~m2ist.evidence.ablation`), the baselines M²IST is compared with (:mod:`~m2ist.evidence.baselines`) and
the exact memory accounting they report (:mod:`~m2ist.evidence.profiling`).

These modules import the library; the library (the method and the REC pipeline) never imports them
(``tests/test_layout.py`` guards that). Only the command line and the example notebooks reach in here.
"""
