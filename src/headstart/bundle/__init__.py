"""The bundle: one folder, JSON + safetensors (+ PEFT adapters), written atomically, checked on load.

`format` reads and writes the files, `manifest` holds the schema, `adapters` vets PEFT folders,
`heads` composes several heads over one base, `specialist` is the base class of
`classifier.Specialist` and `generator.LMSpecialist`, `card` writes the model card, and `commands`
holds the kind-independent operations (info, predict, evaluate, export) the CLI is generated from.
"""
from .format import (ADAPTER_DIR, FORMAT, FORMAT_VERSION, MANIFEST, TRAINED, check_base, read_manifest, read_trained,
                     write_bundle)

__all__ = ["ADAPTER_DIR", "FORMAT", "FORMAT_VERSION", "MANIFEST", "TRAINED", "check_base", "read_manifest",
           "read_trained", "write_bundle"]
