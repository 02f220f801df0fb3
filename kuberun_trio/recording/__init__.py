"""Session recording: one asciicast v2 file per session channel (``audit.*`` keys).

``asciicast`` formats the file (pure functions); ``recorder`` holds the bounded
per-channel buffers the data path appends to and the one writer task per gateway that
drains them to disk. See ``docs/sessions.md``.
"""

from .recorder import Recorder as Recorder
from .recorder import RecordingOptions as RecordingOptions
from .recorder import SessionRecording as SessionRecording
