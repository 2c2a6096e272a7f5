"""The book's analyses beyond MAD, each computing its chapter's tables and statements: quirkiness and
the variance ratio (:mod:`.quirkiness`), SAE drift under fine-tuning (:mod:`.drift`), real vs
synthetic activations (:mod:`.perturb`), the zoo appendix (:mod:`.zoo`) and speed benchmarks
(:mod:`.benchmarks`). Their figures are in :mod:`madlib.plots`; the MAD chapter's run is
:mod:`madlib.mad.chapter`."""
