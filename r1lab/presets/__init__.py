"""YAML presets shipped with r1lab (one section per stage)."""
