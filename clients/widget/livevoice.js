// livevoice protocol v1 codec for browsers and node: the JavaScript port of protocol/codec.py and
// protocol/messages.py. Pure functions, no I/O. protocol/SPEC.md is the authority; both codecs are
// tested against protocol/vectors/v1.json.
//
// Known divergence: JSON.parse cannot tell `1` from `1.0`, so an integer field sent as `1.0` is
// accepted here where the Python codec answers bad_message. No conforming peer sends that.

export const PROTOCOL_VERSION = 1;
export const AUDIO_HEADER_SIZE = 12;
export const AUDIO_VERSION = 1;
export const AUDIO_KIND_PCM = 0;
const MAGIC_L = 0x4c; // "L"
const MAGIC_V = 0x56; // "V"

/** An error the protocol defines: `code` is the wire code (see SPEC.md), `messageId` the message
 * id it concerns, when it concerns one. */
export class LivevoiceError extends Error {
  constructor(code, message, messageId = null) {
    super(message);
    this.name = "LivevoiceError";
    this.code = code;
    this.messageId = messageId;
  }
}

// Field kinds, as in the Python dataclasses: str, int, float (any number), bool, dict (object),
// list:<kind> (an array of that kind: list[str] is "list:str").
// [name, kind, required, default]: a default is filled in when the field is absent or null, as the
// Python dataclass would; optional fields without one are left out.
const F = (name, kind, required = false, dflt = undefined) => ({ name, kind, required, dflt });

export const CLIENT_MESSAGES = {
  hello: [F("token", "str"), F("client", "str"), F("protocol", "int")],
  "voice.register": [F("name", "str"), F("format", "str"), F("id", "str"), F("match", "bool"), F("sha256", "str")],
  "voice.use": [F("voice_id", "str", true), F("id", "str"), F("match", "bool")],
  "voice.delete": [F("voice_id", "str", true), F("id", "str")],
  speak: [
    F("id", "str", true),
    F("text", "str", true),
    F("sample_rate", "int"),
    F("user", "str"),
    F("kind", "str"),
    // Channel messages only:
    F("priority", "int"),
    F("interrupt", "bool"),
    F("expire_s", "float"),
    F("voice_id", "str"),
    F("marks", "bool"),
  ],
  cancel: [F("id", "str")],
  ping: [F("id", "str")],
  "channel.join": [
    F("channel", "str", true),
    F("role", "str", true),
    F("sample_rate", "int"),
    F("id", "str"),
    F("resume_message", "str"),
    F("resume_seq", "int"),
    F("marks", "bool"),
  ],
  played: [F("stream", "int", true), F("samples", "int", true)],
  "channel.pause": [F("id", "str")],
  "channel.resume": [F("id", "str")],
  "channel.skip": [F("id", "str")],
  "channel.clear": [F("id", "str")],
  "channel.filter": [
    F("words", "list:str", true),
    F("action", "str", false, () => "mask"),
    F("links", "bool", false, () => false),
    F("id", "str"),
  ],
};

export const SERVER_MESSAGES = {
  ready: [
    F("session_id", "str", true),
    F("protocol", "int", false, () => PROTOCOL_VERSION),
    F("limits", "dict", false, () => ({})),
    F("formats", "dict", false, () => ({})),
    F("features", "list:str"),
  ],
  "voice.ready": [
    F("voice_id", "str", true),
    F("source", "str", true),
    F("ms", "float", true),
    F("name", "str"),
    F("duration_s", "float"),
    F("id", "str"),
    F("quality", "dict"),
    F("matched", "dict"),
  ],
  "voice.deleted": [F("voice_id", "str"), F("pinned", "bool", false, () => false), F("id", "str")],
  queued: [F("id", "str", true), F("position", "int", true)],
  "audio.start": [
    F("id", "str", true),
    F("stream", "int", true),
    F("sample_rate", "int", true),
    F("channels", "int", false, () => 1),
    F("encoding", "str", false, () => "s16le"),
    // A channel's message heard as a listener:
    F("channel", "str"),
    F("text", "str"),
    F("voice", "str"),
    F("user", "str"),
    F("kind", "str"),
    F("message", "str"),
    F("replayed", "bool"),
    F("resumed_from", "int"),
    F("marks", "list:str"),
  ],
  "audio.marks": [
    F("id", "str", true),
    F("stream", "int", true),
    F("words", "list:dict"),
    F("visemes", "list:dict"),
    F("mouth", "dict"),
  ],
  "audio.end": [
    F("id", "str", true),
    F("stream", "int", true),
    F("frames", "int", true),
    F("samples", "int", true),
    F("duration_ms", "float", true),
    F("ttfa_ms", "float", true),
    F("cancelled", "bool", false, () => false),
    F("truncated", "bool", false, () => false),
    F("channel", "str"),
    F("loudness_lufs", "float"),
  ],
  cancelled: [F("id", "str", true)],
  pong: [F("id", "str")],
  error: [F("code", "str", true), F("message", "str", true), F("id", "str")],
  "channel.joined": [F("channel", "str", true), F("role", "str", true), F("id", "str"), F("resumed", "bool")],
  "channel.state": [F("channel", "str", true), F("waiting", "int", true), F("paused", "bool", true)],
  "channel.played": [F("channel", "str", true), F("message", "str", true), F("ms", "float", true)],
  "channel.filtered": [
    F("channel", "str", true),
    F("words", "int", true),
    F("action", "str", true),
    F("links", "bool", true),
    F("id", "str"),
  ],
};

/** Every error code in SPEC.md. */
export const ERROR_CODES = [
  "bad_json", "bad_message", "unknown_type", "unexpected_binary", "bad_audio_frame",
  "frame_too_large", "bad_utf8", "hello_required", "hello_timeout", "unauthorized", "unexpected_message",
  "idle_timeout", "too_many_sessions", "rate_limited", "clip_expected", "clip_needed", "unsupported", "no_voice",
  "voice_not_found", "voice_unavailable", "clip_empty", "clip_not_audio", "clip_silent", "clip_too_short",
  "clip_too_long", "clip_too_large", "clip_not_speech", "encoder_failed", "encoder_busy", "voice_failed",
  "empty_text", "text_too_long", "queue_full", "duplicate_id",
  "unsupported_sample_rate", "synthesis_failed", "bad_channel", "not_a_speaker", "listener_too_slow", "expired", "filtered", "channel_unavailable", "internal_error",
];

const isObject = (v) => typeof v === "object" && v !== null && !Array.isArray(v);

function matches(value, kind) {
  switch (kind) {
    case "str":
      return typeof value === "string";
    case "int":
      return typeof value === "number" && Number.isInteger(value);
    case "float":
      return typeof value === "number" && Number.isFinite(value);
    case "bool":
      return typeof value === "boolean";
    case "dict":
      return isObject(value);
    default:
      // "list:<kind>": an array whose every item is of that kind (Python's list[...]).
      if (kind.startsWith("list:")) {
        return Array.isArray(value) && value.every((v) => matches(v, kind.slice(5)));
      }
      return true;
  }
}

/** Build a message object from a decoded JSON object, checking every field's type. Unknown
 * fields are ignored; the result holds `type` and the known fields in schema order. */
function fromWire(type, schema, obj) {
  const messageId = typeof obj.id === "string" ? obj.id : null;
  const out = { type };
  for (const f of schema) {
    const value = obj[f.name];
    if (value === undefined || value === null) {
      if (f.required) throw new LivevoiceError("bad_message", `${type}: missing field '${f.name}'`, messageId);
      if (f.dflt !== undefined) out[f.name] = f.dflt();
      continue;
    }
    if (!matches(value, f.kind)) {
      throw new LivevoiceError("bad_message", `${type}: field '${f.name}' has the wrong type`, messageId);
    }
    out[f.name] = value;
  }
  return out;
}

function decodeWith(frame, registry) {
  let obj;
  try {
    obj = JSON.parse(typeof frame === "string" ? frame : new TextDecoder().decode(frame));
  } catch (exc) {
    throw new LivevoiceError("bad_json", `control frame is not valid JSON: ${exc.message}`);
  }
  if (!isObject(obj)) throw new LivevoiceError("bad_message", "control frame must be a JSON object");
  const type = obj.type;
  if (typeof type !== "string") throw new LivevoiceError("bad_message", "control frame has no string 'type'");
  if (!Object.hasOwn(registry, type)) {
    const messageId = typeof obj.id === "string" ? obj.id : null;
    throw new LivevoiceError("unknown_type", `unknown message type '${type.slice(0, 64)}'`, messageId);
  }
  return fromWire(type, registry[type], obj);
}

/** A control frame sent by the server (what a client reads). Throws LivevoiceError. */
export function decodeServer(frame) {
  return decodeWith(frame, SERVER_MESSAGES);
}

/** A control frame sent by a client (what the server reads); for tests and tools. */
export function decodeClient(frame) {
  return decodeWith(frame, CLIENT_MESSAGES);
}

/** The text of one WebSocket frame for a message `{type, ...fields}`. Fields are checked against
 * the schema (a client or server type); null/undefined ones are left out, unknown ones dropped. */
export function encode(message) {
  const type = message.type;
  const registry = [CLIENT_MESSAGES, SERVER_MESSAGES].find((r) => typeof type === "string" && Object.hasOwn(r, type));
  if (!registry) throw new LivevoiceError("unknown_type", `unknown message type '${String(type).slice(0, 64)}'`);
  return JSON.stringify(fromWire(type, registry[type], message));
}

// Builders for what a client sends.
export const hello = ({ token, client, protocol = PROTOCOL_VERSION } = {}) => encode({ type: "hello", token, client, protocol });
export const voiceRegister = ({ name, format, id, match, sha256 } = {}) =>
  encode({ type: "voice.register", name, format, id, match, sha256 });
export const voiceUse = (voiceId, { id, match } = {}) => encode({ type: "voice.use", voice_id: voiceId, id, match });
export const voiceDelete = (voiceId, { id } = {}) => encode({ type: "voice.delete", voice_id: voiceId, id });
export const speak = (id, text, { sampleRate, user, kind, priority, interrupt, expireS, voiceId } = {}) =>
  encode({ type: "speak", id, text, sample_rate: sampleRate, user, kind, priority, interrupt, expire_s: expireS, voice_id: voiceId });
export const channelJoin = (channel, role, { sampleRate, id, resumeMessage, resumeSeq, marks } = {}) =>
  encode({
    type: "channel.join", channel, role, sample_rate: sampleRate, id,
    resume_message: resumeMessage, resume_seq: resumeMessage == null ? undefined : resumeSeq,
    marks,
  });
export const channelPause = (id) => encode({ type: "channel.pause", id });
export const channelResume = (id) => encode({ type: "channel.resume", id });
export const channelSkip = (id) => encode({ type: "channel.skip", id });
export const channelClear = (id) => encode({ type: "channel.clear", id });
export const channelFilter = (words, { action, links, id } = {}) =>
  encode({ type: "channel.filter", words, action, links, id });
export const cancel = (id) => encode({ type: "cancel", id });
/** A listener's playback position (R20): samples of `stream` it has actually played. */
export const played = (stream, samples) => encode({ type: "played", stream, samples });
export const ping = (id) => encode({ type: "ping", id });

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

function asBytes(frame) {
  // A plain Uint8Array always: node's Buffer.slice() would share memory instead of copying.
  if (frame instanceof ArrayBuffer) return new Uint8Array(frame);
  if (ArrayBuffer.isView(frame)) return new Uint8Array(frame.buffer, frame.byteOffset, frame.byteLength);
  throw new LivevoiceError("bad_audio_frame", "audio frame must be binary");
}

/** A binary audio frame: `{stream, seq, pcm}` with `pcm` an Int16Array (its own copy). */
export function decodeAudioFrame(frame) {
  const bytes = asBytes(frame);
  if (bytes.length < AUDIO_HEADER_SIZE) {
    throw new LivevoiceError("bad_audio_frame", `audio frame shorter than its ${AUDIO_HEADER_SIZE}-byte header`);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes[0] !== MAGIC_L || bytes[1] !== MAGIC_V || bytes[2] !== AUDIO_VERSION || bytes[3] !== AUDIO_KIND_PCM) {
    throw new LivevoiceError("bad_audio_frame", "audio frame header has a wrong magic, version or kind");
  }
  const stream = view.getUint32(4, true);
  const seq = view.getUint32(8, true);
  const payload = bytes.length - AUDIO_HEADER_SIZE;
  if (payload % 2) throw new LivevoiceError("bad_audio_frame", "audio frame payload is not whole 16-bit samples");
  let pcm;
  if (LITTLE_ENDIAN) {
    pcm = new Int16Array(bytes.slice(AUDIO_HEADER_SIZE).buffer);
  } else {
    pcm = new Int16Array(payload / 2);
    for (let i = 0; i < pcm.length; i++) pcm[i] = view.getInt16(AUDIO_HEADER_SIZE + 2 * i, true);
  }
  return { stream, seq, pcm };
}

/** The bytes of an audio frame (servers and tests). */
export function encodeAudioFrame({ stream, seq, pcm }) {
  const samples = pcm instanceof Int16Array ? pcm : Int16Array.from(pcm);
  const out = new Uint8Array(AUDIO_HEADER_SIZE + samples.length * 2);
  const view = new DataView(out.buffer);
  out[0] = MAGIC_L;
  out[1] = MAGIC_V;
  out[2] = AUDIO_VERSION;
  out[3] = AUDIO_KIND_PCM;
  view.setUint32(4, stream, true);
  view.setUint32(8, seq, true);
  for (let i = 0; i < samples.length; i++) view.setInt16(AUDIO_HEADER_SIZE + 2 * i, samples[i], true);
  return out;
}

/** s16le samples as floats in [-1, 1) for Web Audio. */
export function pcmToFloat32(pcm) {
  const out = new Float32Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) out[i] = pcm[i] / 32768;
  return out;
}
