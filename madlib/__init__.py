"""madlib: the helper library of the MAD / SAE research compendium.

Modules: ``data`` (quirky datasets), ``tokenizer`` and ``zoo`` (the embedded models), ``activations``
(last-token residual extraction), ``detectors`` (anomaly detectors), ``metrics`` (AUROC, layer
aggregation, bootstrap), ``mad`` (the MAD task), ``plots`` (figures and tables), ``runner``
(one notebook through papermill, and the book: the steps of the workflow in ``Snakefile``), ``grid``
(the real-model grid as jobs).
"""

__version__ = "0.1.0"
