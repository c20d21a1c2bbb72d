"""Containers and bitstreams read without decoding pictures: the video probe (frame count, rate, rotation,
edit lists), MP4 sample tables and H.264/HEVC NAL unit checks.

Imports ``sources/`` (the bytes) and the leaf modules; never decoders, planning or the command line."""
