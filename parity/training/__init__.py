"""Training loops shared by the runners: one per framework, plus the per-step record."""
