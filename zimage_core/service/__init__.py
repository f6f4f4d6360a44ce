"""The request API: everything a caller needs around a loaded :class:`~zimage_core.ZImage`.

The request schema turns an ``imageInference`` request into generation arguments (errors name request fields);
:func:`infer` runs it on a pipeline and builds the response objects; the image store (outputs.py), the async task
registry (taskregistry.py), delivery (webhook, upload; the outbound-call policy in netpolicy.py), face refinement and
cost live here too. The library below never imports this package; the network server above
(``zimage_core/server/``) reaches it only through engine.py.
"""

from .infer import ServerConfig, default_config, get_response, infer
from .netpolicy import OutboundPolicy
from .outputs import FORMATS, ImageStore, LocalImageStore, OutputCache, data_uri, encode_image
from .request import SCHEDULERS, SCHEMA, RequestArgs, validate_request
from .taskregistry import TaskRegistry

__all__ = [
    "FORMATS",
    "ImageStore",
    "SCHEDULERS",
    "SCHEMA",
    "LocalImageStore",
    "OutboundPolicy",
    "OutputCache",
    "RequestArgs",
    "ServerConfig",
    "TaskRegistry",
    "data_uri",
    "default_config",
    "encode_image",
    "get_response",
    "infer",
    "validate_request",
]
