"""File formats: parse and fully validate headers into frozen records; write them."""

from .checkpoint import INDEX_NAME, Checkpoint, read_checkpoint
from .files import FileIdentity
from .manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, Manifest, ManifestSource, ManifestTensor
from .records import TensorRecord
from .safetensors import SafetensorsHeader, SafetensorsWriter, TensorSpec, read_safetensors_header

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "MANIFEST_NAME",
    "Checkpoint",
    "FileIdentity",
    "Manifest",
    "ManifestSource",
    "ManifestTensor",
    "SafetensorsHeader",
    "SafetensorsWriter",
    "TensorRecord",
    "TensorSpec",
    "read_checkpoint",
    "read_safetensors_header",
]
