"""Figures and tables for reading, one file per analysis: shared helpers (:mod:`.common`: the
column's width, :func:`~.common.savefig`, :func:`~.common.write_table`, :func:`~.common.show_table`,
:func:`~.common.glue_all`), the MAD chapter (:mod:`.mad`), the zoo appendix (:mod:`.zoo`),
quirkiness and separation (:mod:`.quirkiness`), SAE drift (:mod:`.drift`) and perturbations
(:mod:`.perturb`). The numbers they draw are computed in :mod:`madlib.analyses` and :mod:`madlib.mad`."""
