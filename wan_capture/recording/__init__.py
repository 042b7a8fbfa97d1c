"""The recording stage: one key per recorded array, one read interface over memory and saved folders."""
from ..keys import ArrayKey, key_path, metadata_path
from .memory import MemoryRecording
from .recording import FolderRecording, Recording

__all__ = ["ArrayKey", "key_path", "metadata_path", "Recording", "MemoryRecording", "FolderRecording"]
