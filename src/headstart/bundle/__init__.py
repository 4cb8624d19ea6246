"""The bundle: one folder, JSON + safetensors (+ PEFT adapter), written atomically."""
from .format import FORMAT, MANIFEST, TRAINED, check_base, read_manifest, read_trained, write_bundle

__all__ = ["FORMAT", "MANIFEST", "TRAINED", "check_base", "read_manifest", "read_trained", "write_bundle"]
