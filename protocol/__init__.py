"""The livevoice wire protocol, sans-I/O: messages, codec, errors and both ends of a session.

``ServerProtocol`` (``state.py``) owns every session rule; ``ClientProtocol`` (``client.py``) is
how a client reads the server's frames. See SPEC.md beside this file. Imports no asyncio,
aiohttp, redis or torch.
"""

from .client import ClientProtocol
from .codec import AUDIO_HEADER, AudioFrame, decode_client, decode_server, encode
from .errors import LivevoiceError
from .messages import PROTOCOL_VERSION, Message
from .state import ClipUpload, ServerProtocol, SessionState, SpeakJob, VoiceRequest

__all__ = [
    "AUDIO_HEADER",
    "PROTOCOL_VERSION",
    "AudioFrame",
    "ClientProtocol",
    "ClipUpload",
    "LivevoiceError",
    "Message",
    "ServerProtocol",
    "SessionState",
    "SpeakJob",
    "VoiceRequest",
    "decode_client",
    "decode_server",
    "encode",
]
