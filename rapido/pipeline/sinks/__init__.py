"""Where a stream's frames leave the process: the sink seam and the plain sinks."""

#: The sinks a session may ask for by name; a node registers a provider for each.
SINK_NAMES = ("null", "record", "webrtc", "livekit")
