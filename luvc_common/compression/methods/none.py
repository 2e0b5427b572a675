"""No compression: the stock model."""
from luvc_common.compression.methods.base import Method

METHOD = Method("none")
