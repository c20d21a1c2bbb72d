"""Sources: turn a value (path, URL, object-store URL, ``data:`` URI, bytes, file object) into bytes under the
fetch policy: local files, HTTP with ranged reads, object stores, the media cache, and the policy itself.

Imports only the package's leaf modules (``_errors``, ``_util``, ``_cancel``); never containers, decoders,
planning or the command line."""
