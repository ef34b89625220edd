"""Configuration: YAML files with Synapse's key names, validated by a schema."""

from homeserver.config.loader import ConfigError, HomeserverConfig, load_config

__all__ = ["ConfigError", "HomeserverConfig", "load_config"]
