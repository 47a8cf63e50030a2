"""The core: what knows TransformerLens and no study (backends, hooks, heads, input checks,
paragraphs, the teacher-forced kernel, objectives, reduced precision, result types, files)."""
