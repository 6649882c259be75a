"""The livevoice wire protocol, sans-I/O: messages, codec, errors and the session state machine.

See SPEC.md beside this file. Imports no asyncio, aiohttp, redis or torch.
"""

from .codec import AUDIO_HEADER, AudioFrame, decode_client, decode_server, encode
from .errors import LivevoiceError
from .messages import PROTOCOL_VERSION, Message
from .state import ClipUpload, ServerProtocol, SessionState

__all__ = [
    "AUDIO_HEADER",
    "PROTOCOL_VERSION",
    "AudioFrame",
    "ClipUpload",
    "LivevoiceError",
    "Message",
    "ServerProtocol",
    "SessionState",
    "decode_client",
    "decode_server",
    "encode",
]
