"""Mechanistic anomaly detection: the task (:mod:`.task`), the backdoor task (:mod:`.backdoor`), metrics
(:mod:`.metrics`) and the full method suite (:mod:`.suite`)."""
