"""The old name of the service's request API: ``zimage_core.service`` is the home of these names."""

from .service import LocalImageStore, ServerConfig, default_config, get_response, infer

__all__ = ["LocalImageStore", "ServerConfig", "default_config", "get_response", "infer"]
