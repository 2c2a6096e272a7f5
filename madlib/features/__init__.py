"""Per-prompt features of a model: last-token activations (:mod:`.activations`) and their on-disk cache
(:mod:`.cache`), sparse autoencoders (:mod:`.sae`) and attribution-patching effects (:mod:`.attribution`)."""
