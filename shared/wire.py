"""Wire limits both sides share, importable without torch (the benchmarks' fake clients use them).

A model's bytes travel as chunks of ``CHUNK_SIZE``; every message carries at most one chunk plus a
small header, and gRPC refuses anything larger than ``MAX_MESSAGE_BYTES`` on either side, so the
largest message a hostile peer can make the server read is bounded and explicit.
"""

CHUNK_SIZE = 1 << 20  # 1 MiB: far below gRPC's default 4 MiB message limit, whatever the model size
MAX_MESSAGE_BYTES = CHUNK_SIZE + 64 * 1024
