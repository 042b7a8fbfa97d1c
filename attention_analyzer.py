"""``from attention_analyzer import AttentionAnalyzer``: the import the storage contract's examples use."""
from wan_capture.recording.analyzer import AttentionAnalyzer, load_array  # noqa: F401
