"""madlib: the helper library of the MAD / SAE research compendium.

Subpackages, each building on those before it:

* :mod:`madlib.data`: the quirky datasets (a registry entry per dataset) and the hub datasets;
* :mod:`madlib.models`: tokenizer, training primitives, the zoo (bases, quirky fine-tunes), plain
  fine-tuning, hub models, and :mod:`madlib.models.info`, the typed record a loader attaches;
* :mod:`madlib.features`: last-token activations and their cache, SAEs, attribution features;
* :mod:`madlib.detectors`: the anomaly detectors, listed by :func:`madlib.detectors.names`;
* :mod:`madlib.mad`: the MAD and backdoor tasks, metrics, the method suite, the MAD chapter;
* :mod:`madlib.analyses`: the other chapters' computations and claims;
* :mod:`madlib.plots`: figures and tables, a module per analysis;
* :mod:`madlib.workflow`: one notebook through papermill, the book, the real-model grid.

At the top level, :mod:`madlib.codehash` (cache keys from the code's definitions) and
:mod:`madlib.paths` (where generated files go).
"""

__version__ = "0.1.0"
