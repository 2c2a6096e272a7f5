"""Figures and tables: shared helpers (:mod:`.common`)."""
