"""Config: schema (dataclasses) and loading (YAML + overrides, all errors at once)."""

from distmerge.config.load import ConfigSource, load_config, validate
from distmerge.config.schema import AdapterSpec, MergeConfig, MergeSpec, OutputSpec, RuntimeSpec
from distmerge.config.units import format_size, parse_size

__all__ = ["ConfigSource", "AdapterSpec", "MergeConfig", "MergeSpec", "OutputSpec", "RuntimeSpec",
           "load_config", "validate", "parse_size", "format_size"]
