"""GenFL: code shared by the server and the clients (models, data, codec, protocol stubs)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("genfl")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
