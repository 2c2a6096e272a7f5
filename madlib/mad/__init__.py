"""Mechanistic anomaly detection: the task (:mod:`.task`), the backdoor task (:mod:`.backdoor`), metrics
(:mod:`.metrics`), the full method suite (:mod:`.suite`) and the MAD chapter's run and tables (:mod:`.chapter`)."""
