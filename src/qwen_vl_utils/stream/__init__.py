"""Streaming: a long or live video as chunks of frames, decoded in one pass over the same frame plan, sizes and
resize as ``fetch_video`` (``_video_stream``), from files read once with parallel GOP decoding (``_file``) or
live byte streams, HLS and UDP (``_live``).

Imports the core (``video``, ``_frame_resize``, ``_options``), ``backends/``, ``container/`` and ``sources/``;
never the command line."""

from ._video_stream import READ_AHEAD, VideoChunk, VideoStream, stream_video

__all__ = ["READ_AHEAD", "VideoChunk", "VideoStream", "stream_video"]
