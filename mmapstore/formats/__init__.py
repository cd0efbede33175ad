"""File formats: parse and fully validate headers into frozen records; write them."""

from ._checkpoint import INDEX_NAME, Checkpoint, read_checkpoint
from ._files import FileIdentity
from ._gguf import GGUFHeader, is_gguf, read_gguf_files, read_gguf_header
from ._manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, Manifest, ManifestSource, ManifestTensor
from ._records import TensorRecord
from ._safetensors import SafetensorsHeader, SafetensorsWriter, TensorSpec, read_safetensors_header

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "MANIFEST_NAME",
    "Checkpoint",
    "FileIdentity",
    "GGUFHeader",
    "Manifest",
    "ManifestSource",
    "ManifestTensor",
    "SafetensorsHeader",
    "SafetensorsWriter",
    "TensorRecord",
    "TensorSpec",
    "is_gguf",
    "read_checkpoint",
    "read_gguf_files",
    "read_gguf_header",
    "read_safetensors_header",
]
