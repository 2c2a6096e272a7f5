"""The book's analyses beyond MAD: quirkiness and the variance ratio (:mod:`.quirkiness`), SAE drift under
fine-tuning (:mod:`.drift`), real vs synthetic activations (:mod:`.perturb`) and speed benchmarks
(:mod:`.benchmarks`)."""
