"""Output: streamed safetensors parts, byte-copy assembly into shards or one file, index, manifest,
and the atomic finalize that makes a failed merge leave nothing behind."""

from distmerge.output.assemble import consolidate, write_files, write_json
from distmerge.output.staging import Staging

__all__ = ["Staging", "consolidate", "write_files", "write_json"]
