// The livevoice widget: an OBS browser source (mode=overlay), word captions for one
// (mode=captions) and a chat TTS page (mode=chat).
//
// Configured by the page's query string:
//   server   WebSocket URL (default: this host's /ws)      token   bearer token
//   voice    voice id to pin with voice.use                volume  0..1 (default 1)
//   mode     overlay (transparent, queue + skip + volume) | chat (adds a text box and a clip picker)
//            | captions (with channel: only the line spoken now, its spoken word highlighted)
//   buffer   jitter buffer in ms before each message starts (default 80)
//   channel  a channel of this tenant to join (SPEC.md "Channels"): the overlay joins it to listen
//            (plays every message and shows its line: the OBS source beside a chat bot); chat
//            joins it to speak, with the channel's queue controls (pause/resume, skip, clear)
//   listen   with mode=chat and channel: 1 joins as "both", to hear the channel here as well
//   mute     1: play nothing (volume 0): captions beside another source that plays the channel
//   font, size, color, highlight, bg
//            the line's look in captions and overlay: a CSS font family, a size (64 = 64px, or a
//            CSS length), colours as CSS colours or bare hex (ffd84d), bg behind the line
//
// Captions: a listener joins with marks (SPEC.md "Marks") and gets each message's word marks in
// samples of its stream before the frames they describe. The word highlighted is the last one
// whose start the PLAYBACK has reached: the worklet's played position (reported with the audio
// frame it was reached at) carried forward by the audio clock each animation frame, less the
// output latency, so the highlight follows what is heard, not what arrived.
//
// A listener (overlay, or chat with listen=1) keeps the last channel message and frame it PLAYED
// (the worklet's playback position, not what arrived) in sessionStorage, keyed by server and
// channel, and passes it back on every join (SPEC.md "Resume"): a refreshed OBS source, or one
// whose socket dropped, gets what it had not played yet replayed, so a paid message is not lost.
//
// One WebSocket session; PCM goes to an AudioWorklet (player-worklet.js) running at the stream's
// sample rate. An overlay without a channel speaks what it is sent on BroadcastChannel("livevoice")
// as {type:"speak", text} / {type:"skip"}, or through window.livevoice.speak(). Test hooks and
// counters live on window.livevoice.

import * as lv from "./livevoice.js";

const params = new URLSearchParams(location.search);
const numberParam = (name, dflt, lo, hi) => {
  const v = Number.parseFloat(params.get(name) ?? "");
  return Number.isFinite(v) ? Math.min(hi, Math.max(lo, v)) : dflt;
};
const config = {
  server: params.get("server") || `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`,
  token: params.get("token") || undefined,
  voice: params.get("voice") || null,
  volume: params.get("mute") === "1" ? 0 : numberParam("volume", 1, 0, 1),
  mute: params.get("mute") === "1",
  mode: ["chat", "captions"].includes(params.get("mode")) ? params.get("mode") : "overlay",
  bufferMs: numberParam("buffer", 80, 0, 2000),
  channel: params.get("channel") || null,
  listen: params.get("listen") === "1",
};
// An overlay (or captions) only listens: it is the OBS source, and a listener may not steer the
// queue (the server answers not_a_speaker). A chat page speaks; with listen=1 it hears the channel.
const channelRole = !config.channel ? null : config.mode !== "chat" ? "listen" : config.listen ? "both" : "speak";
const isSpeaker = channelRole === "speak" || channelRole === "both";
const CLIENT_NAME = "livevoice-widget/0.1";
const TERMINAL = new Set(["done", "cancelled", "failed"]);

// --- state and test hooks -------------------------------------------------------------------
const hooks = {
  config,
  status: "connecting",
  sessionId: null,
  ready: null,
  voice: null, // the last voice.ready
  audio: { state: "none", sampleRate: null },
  sampleRate: undefined, // what speak asks for: the audio context's rate when the server offers it
  counters: {
    framesReceived: 0,
    framesOutOfOrder: 0,
    framesUnknownStream: 0,
    underruns: 0,
    messagesDone: 0,
    messagesCancelled: 0,
    messagesFailed: 0,
    reconnects: 0,
    clipReuploads: 0,
    clipUploads: 0, // clips sent (a clip registered by its hash alone is not)
    messagesHeard: 0, // channel messages that started here as a listener
    marksReceived: 0, // audio.marks messages for a stream heard here
  },
  // Word highlighting (captions and the overlay's line): `word` is the highlighted word of the
  // current line ({message, index, text}); `log` the last highlights, each with `frame` (the
  // audio clock, in output samples, when it was drawn), `due` (the output sample its start
  // played at) and `offsetMs` = (frame - due) in ms: how late the caption is to the audio.
  captions: { word: null, log: [], outputLatencyMs: null },
  // The channel joined (config.channel), as the server last said: its queue length and pause come
  // from channel.state; `current` is the channel message this page is playing now.
  // `position` is the last {message, seq} played here (message-sequence number of the frame;
  // -1: none of it), passed back on each join; `resumed` is the server's answer to the last one.
  channel: config.channel
    ? {
        name: config.channel, role: channelRole, joined: false, joins: 0, waiting: 0, paused: false, current: null,
        position: null, resumed: null,
      }
    : null,
  // Per message with audio, by track (a page-wide number: stream numbers restart with each session):
  // {id, stream, frames, nextSeq, inOrder, samples, played, underruns, startFrame, endFrame}
  tracks: {},
  messages: {}, // id -> {id, text, state, position, stream, track, end, skipped, error}
  errors: [], // errors that concern no message: {code, message}
  speak,
  skip,
  cancelAll,
  pause,
  resume,
  togglePause,
  clear,
  register,
  useVoice,
  setVolume,
};
window.livevoice = hooks;

// --- where a listener is in the channel (R18) -------------------------------------------------
const POSITION_KEY = `livevoice:position:${config.server}:${config.channel}`;
const listens = channelRole === "listen" || channelRole === "both";

function loadPosition() {
  try {
    const p = JSON.parse(sessionStorage.getItem(POSITION_KEY) || "null");
    return p && typeof p.message === "string" && Number.isInteger(p.seq) ? p : null;
  } catch {
    return null; // storage refused (privacy settings) or garbled: start from now
  }
}

function savePosition(position) {
  hooks.channel.position = position;
  try {
    sessionStorage.setItem(POSITION_KEY, JSON.stringify(position));
  } catch {
    // Not kept across a refresh then; a reconnect still resumes from memory.
  }
}

/** The worklet played `played` samples of a heard track: its frames played whole are heard. */
function notePlayed(s, played, track) {
  if (!hooks.channel || !listens || s.message == null) return;
  while (s.playedFrames < s.frameEnds.length && s.frameEnds[s.playedFrames] <= played) s.playedFrames += 1;
  const seq = s.resumedFrom + s.playedFrames - 1;
  const p = hooks.channel.position;
  if (!p || p.message !== s.message || p.seq !== seq) savePosition({ message: s.message, seq });
  reportPlayed(s, played, track);
}

// What this page (the OBS source) has played goes to the server a few times a second (R20), which
// passes it to the channel's other listeners: a VTube Studio bridge follows what the audience hears.
const PLAYED_EVERY_MS = 250;
let playedSentAt = -Infinity;
function reportPlayed(s, played, track) {
  const now = performance.now();
  if (now - playedSentAt < PLAYED_EVERY_MS || !ws || ws.readyState !== WebSocket.OPEN) return;
  if (sessionTracks.get(s.stream) !== track) return; // a stream of a socket that closed since
  playedSentAt = now;
  send(lv.played(s.stream, Math.max(0, Math.round(played))));
  hooks.counters.playedReports = (hooks.counters.playedReports ?? 0) + 1;
}

if (hooks.channel && listens) hooks.channel.position = loadPosition();

const ui = {
  app: document.getElementById("app"),
  status: document.getElementById("status"),
  queue: document.getElementById("queue"),
  skip: document.getElementById("skip"),
  volume: document.getElementById("volume"),
  chat: document.getElementById("chat"),
  text: document.getElementById("text"),
  clip: document.getElementById("clip"),
  voice: document.getElementById("voice"),
  overlayLink: document.getElementById("overlay-link"),
  enableAudio: document.getElementById("enable-audio"),
  line: document.getElementById("line"),
  lineUser: document.getElementById("line-user"),
  lineText: document.getElementById("line-text"),
  channelControls: document.getElementById("channel-controls"),
  pause: document.getElementById("pause"),
  clear: document.getElementById("clear"),
  channelState: document.getElementById("channel-state"),
};

// --- audio ----------------------------------------------------------------------------------
let ctx = null;
let player = null;
let gain = null;

async function setupAudio(rate) {
  if (ctx) return;
  try {
    ctx = new AudioContext({ sampleRate: rate, latencyHint: "interactive" });
  } catch {
    ctx = new AudioContext({ latencyHint: "interactive" }); // this browser refuses that rate
  }
  if (!ctx.audioWorklet) {
    throw new Error("AudioWorklet needs a secure context: open the widget over https or from localhost");
  }
  await ctx.audioWorklet.addModule(new URL("./player-worklet.js", import.meta.url));
  player = new AudioWorkletNode(ctx, "livevoice-player", {
    numberOfInputs: 0,
    numberOfOutputs: 1,
    outputChannelCount: [1],
    processorOptions: { prebufferMs: config.bufferMs },
  });
  gain = new GainNode(ctx, { gain: config.volume });
  player.connect(gain).connect(ctx.destination);
  player.port.onmessage = (event) => onPlayer(event.data);
  hooks.audio.sampleRate = ctx.sampleRate;
  const syncState = () => {
    hooks.audio.state = ctx.state;
    ui.enableAudio.hidden = ctx.state === "running";
  };
  ctx.onstatechange = syncState;
  ctx.resume().catch(() => {}); // refused without a user gesture unless autoplay is allowed
  syncState();
}

ui.enableAudio.addEventListener("click", () => ctx && ctx.resume());

function onPlayer(msg) {
  const s = hooks.tracks[msg.track];
  if (!s) return;
  const m = hooks.messages[s.id];
  if (msg.type === "started" || msg.type === "played" || msg.type === "finished") notePlayed(s, msg.played ?? 0, msg.track);
  if (msg.type === "started") s.clock = { played: 0, frame: msg.frame };
  else if (msg.type === "played" && msg.frame != null) s.clock = { played: msg.played, frame: msg.frame };
  if (msg.type === "played") return; // every 50 ms: nothing to draw
  if (msg.type === "started") {
    s.startFrame = msg.frame;
    if (m && !TERMINAL.has(m.state)) m.state = "playing";
    if (m && m.heard && hooks.channel) {
      hooks.channel.current = m;
      followCaptions();
    }
  } else if (msg.type === "underrun") {
    s.underruns += 1;
    hooks.counters.underruns += 1;
  } else if (msg.type === "finished") {
    s.played = msg.played;
    s.endFrame = msg.frame;
    if (m && hooks.channel && hooks.channel.current === m) hooks.channel.current = null;
    if (m) {
      if (m.lost) finish(m, "failed", { code: "connection_lost", message: "the connection dropped" });
      else if (m.skipped || msg.skipped || (m.end && m.end.cancelled)) finish(m, "cancelled");
      else finish(m, "done");
    }
  }
  render();
}

function toFloat(pcm, fromRate) {
  const samples = lv.pcmToFloat32(pcm);
  const toRate = ctx.sampleRate;
  if (fromRate === toRate) return samples;
  // Only when the browser refused the stream's rate for the context: linear, good enough for speech.
  const out = new Float32Array(Math.round((samples.length * toRate) / fromRate));
  const step = fromRate / toRate;
  for (let i = 0; i < out.length; i++) {
    const x = i * step;
    const j = Math.floor(x);
    const a = samples[j] ?? 0;
    const b = samples[j + 1] ?? a;
    out[i] = a + (b - a) * (x - j);
  }
  return out;
}

function setVolume(v) {
  config.volume = Math.min(1, Math.max(0, Number(v)));
  if (gain) gain.gain.setTargetAtTime(config.volume, ctx.currentTime, 0.02);
  ui.volume.value = String(config.volume);
}

// --- connection -----------------------------------------------------------------------------
let ws = null;
let attempt = 0;
let nextId = 0;
let pendingVoice = []; // voice.register / voice.use answers come without an id: first in, first out
let clip = null; // {bytes, name, format, voiceId}: re-uploaded if a restarted server lost the voice
let lastTrack = 0;
let sessionTracks = new Map(); // this session's stream number -> track

function connect() {
  hooks.status = attempt ? "reconnecting" : "connecting";
  render();
  sessionTracks = new Map();
  // Browsers cannot set headers on a WebSocket: the token goes in the upgrade's query instead
  // (the server keeps query strings out of its access log), and in hello as well.
  const url = new URL(config.server, location.href);
  if (config.token) url.searchParams.set("token", config.token);
  const sock = new WebSocket(url.toString());
  sock.binaryType = "arraybuffer";
  ws = sock;
  sock.onopen = () => sock.send(lv.hello({ token: config.token, client: CLIENT_NAME }));
  sock.onmessage = (event) => {
    if (sock !== ws) return;
    try {
      if (typeof event.data === "string") onControl(lv.decodeServer(event.data));
      else onAudio(lv.decodeAudioFrame(event.data));
    } catch (exc) {
      report(exc.code || "client_error", exc.message);
    }
  };
  sock.onclose = (event) => {
    if (sock === ws) onClose(event);
  };
}

function onClose(event) {
  ws = null;
  if (hooks.channel) hooks.channel.joined = false;
  for (const p of pendingVoice) p.reject(new lv.LivevoiceError("connection_lost", "the connection dropped"));
  pendingVoice = [];
  for (const m of Object.values(hooks.messages)) {
    if (TERMINAL.has(m.state)) continue;
    if (m.track != null && player) {
      m.lost = true; // what arrived still plays out; then it counts as failed
      player.port.postMessage({ type: "end", track: m.track });
    } else {
      finish(m, "failed", { code: "connection_lost", message: "the connection dropped" });
    }
  }
  if (event.code === 4401) {
    hooks.status = "unauthorized";
    render();
    return;
  }
  hooks.status = "reconnecting";
  const delay = Math.min(5000, 250 * 2 ** attempt) * (1 - 0.5 * Math.random());
  attempt += 1;
  setTimeout(connect, delay);
  render();
}

function send(text) {
  if (!ws || ws.readyState !== WebSocket.OPEN) throw new lv.LivevoiceError("connection_lost", "not connected");
  ws.send(text);
}

/** voice.use, tried again while the server answers voice_unavailable (its voice store did not
 * answer: the voice exists, so it is never forgotten for that). */
async function useVoiceRetrying(voiceId, sock) {
  for (let attempt = 0; ; attempt++) {
    try {
      return await useVoice(voiceId);
    } catch (exc) {
      if (exc.code !== "voice_unavailable" || ws !== sock || attempt >= 8) throw exc;
      hooks.counters.voiceRetries = (hooks.counters.voiceRetries || 0) + 1;
      await new Promise((r) => setTimeout(r, Math.min(5000, 250 * 2 ** attempt)));
    }
  }
}

async function onReady(msg) {
  const sock = ws;
  const reconnect = hooks.sessionId !== null;
  hooks.ready = msg;
  hooks.sessionId = msg.session_id;
  const rates = msg.formats.sample_rates || [];
  await setupAudio(msg.formats.default_sample_rate || 48000);
  hooks.sampleRate = rates.includes(ctx.sampleRate) ? ctx.sampleRate : undefined;
  const voiceId = hooks.voice ? hooks.voice.voice_id : config.voice;
  if (voiceId) {
    try {
      await useVoiceRetrying(voiceId, sock);
    } catch (exc) {
      if (exc.code === "voice_not_found" && clip && clip.voiceId === voiceId) {
        hooks.counters.clipReuploads += 1;
        await sendClip(clip, { byHash: false }); // the server forgot the voice: its hash misses too
      } else {
        report(exc.code, `voice ${voiceId}: ${exc.message}`);
      }
    }
  }
  if (ws !== sock) return; // dropped again meanwhile
  if (config.channel) {
    // Joined again on every connection: a new session is a new member. A listener passes back
    // the last frame it played; when the server still has what followed (channel.joined
    // resumed: true) it is replayed, else the channel is heard from now and what was playing
    // when the socket dropped plays out from what had arrived.
    const p = listens ? hooks.channel.position : null;
    send(
      lv.channelJoin(config.channel, channelRole, {
        sampleRate: hooks.sampleRate,
        id: `join${hooks.channel.joins + 1}`,
        resumeMessage: p ? p.message : undefined,
        resumeSeq: p ? p.seq : undefined,
        marks: listens || undefined, // word marks for the line's highlighting
      }),
    );
  }
  if (reconnect) hooks.counters.reconnects += 1;
  keepAlive(sock, msg.limits.idle_timeout_s);
  attempt = 0;
  hooks.status = "open";
  render();
}

// The server closes sessions that send nothing for idle_timeout_s (an overlay may wait for hours);
// a browser cannot send WebSocket pings, so it sends protocol pings.
function keepAlive(sock, idleTimeoutS) {
  const every = Math.max(5, Math.min(60, (idleTimeoutS || 600) / 3)) * 1000;
  const timer = setInterval(() => {
    if (sock !== ws || sock.readyState !== WebSocket.OPEN) clearInterval(timer);
    else sock.send(lv.ping());
  }, every);
}

function onControl(msg) {
  const m = msg.id != null ? hooks.messages[msg.id] : undefined;
  switch (msg.type) {
    case "ready":
      onReady(msg).catch((exc) => report(exc.code || "client_error", exc.message));
      break;
    case "voice.ready": {
      hooks.voice = msg;
      const p = pendingVoice.shift();
      if (p) p.resolve(msg);
      break;
    }
    case "voice.deleted":
      // Deleted by this tenant (here or elsewhere): never re-pin or re-upload it.
      if (msg.pinned || (hooks.voice && msg.voice_id === hooks.voice.voice_id)) hooks.voice = null;
      if (clip && (msg.pinned || msg.voice_id === clip.voiceId)) clip = null;
      if (msg.pinned) report("voice_deleted", "the voice was deleted; register or pick another");
      break;
    case "queued":
      if (m && m.state === "sending") {
        m.state = "queued";
        m.position = msg.position;
      }
      break;
    case "audio.start":
      if (msg.channel != null) {
        onHeardStart(msg);
        break;
      }
      if (!m) break;
      startTrack(m, msg);
      if (!TERMINAL.has(m.state) && !m.skipped) m.state = "streaming";
      if (m.skipped) player.port.postMessage({ type: "skip", track: m.track });
      break;
    case "audio.end":
      if (msg.channel != null) {
        onHeardEnd(msg);
        break;
      }
      if (!m) break;
      m.end = msg;
      if (m.track != null) player.port.postMessage({ type: "end", track: m.track });
      else if (hooks.channel) finish(m, msg.cancelled ? "cancelled" : "done"); // its completion: the audio went to the listeners
      break;
    case "audio.marks":
      onMarks(msg);
      break;
    case "channel.joined":
      hooks.channel.joined = true;
      hooks.channel.joins += 1;
      hooks.channel.resumed = msg.resumed ?? null;
      if (msg.resumed) {
        // What the old session's tracks still hold past the position is replayed: not twice.
        for (const old of Object.values(hooks.messages)) {
          if (old.heard && old.lost && old.track != null && !TERMINAL.has(old.state)) {
            player.port.postMessage({ type: "skip", track: old.track });
          }
        }
      }
      break;
    case "channel.state":
      hooks.channel.waiting = msg.waiting;
      hooks.channel.paused = msg.paused;
      break;
    case "cancelled":
      if (m) {
        m.serverCancelled = true;
        finish(m, "cancelled");
      }
      break;
    case "error":
      if (m) {
        if (m.track != null) player.port.postMessage({ type: "end", track: m.track });
        finish(m, "failed", { code: msg.code, message: msg.message });
      } else if (msg.id == null && pendingVoice.length) {
        pendingVoice.shift().reject(new lv.LivevoiceError(msg.code, msg.message));
      } else {
        report(msg.code, msg.message);
      }
      break;
  }
  render();
}

function startTrack(m, msg) {
  m.stream = msg.stream;
  m.track = ++lastTrack;
  m.sampleRate = msg.sample_rate;
  sessionTracks.set(msg.stream, m.track);
  hooks.tracks[m.track] = {
    id: m.id, stream: msg.stream, frames: 0, nextSeq: 0, inOrder: true, samples: 0,
    played: 0, underruns: 0, startFrame: null, endFrame: null,
    // A heard message: its channel key, the message's sequence number of frame 0, and where
    // each frame ends in the samples handed to the worklet (what `played` is counted in).
    message: msg.channel != null ? msg.message ?? null : null, resumedFrom: msg.resumed_from ?? 0,
    frameEnds: [], queued: 0, playedFrames: 0,
    clock: null, // {played, frame}: the worklet's last report of where it is (for captions)
  };
  player.port.postMessage({ type: "start", track: m.track });
}

/** A channel message heard as a listener. Its wire id is the producer's (another session's ids
 * may equal this page's own), so it is kept under an id of its own: `c<track>`. */
function onHeardStart(msg) {
  const m = {
    id: `c${lastTrack + 1}`, wireId: msg.id, text: msg.text ?? "", user: msg.user ?? null,
    kind: msg.kind ?? null, voice: msg.voice ?? null, channel: msg.channel, heard: true,
    state: "streaming", position: null, stream: null, track: null, end: null, skipped: false,
    serverCancelled: false, error: null,
    words: [], // word marks so far, in output samples: {text, start, end, at} (`at`: in text)
    marks: msg.marks ?? null,
  };
  hooks.messages[m.id] = m;
  hooks.counters.messagesHeard += 1;
  startTrack(m, msg);
}

function onHeardEnd(msg) {
  const s = hooks.tracks[sessionTracks.get(msg.stream)];
  const m = s && hooks.messages[s.id];
  if (!m) return;
  m.end = msg;
  if (msg.cancelled) {
    // Skipped or cancelled in the channel: the audio stops there, not after what is buffered.
    m.skipped = true;
    player.port.postMessage({ type: "skip", track: m.track });
  }
  player.port.postMessage({ type: "end", track: m.track });
}

/** Word marks for a stream heard here: kept in output samples (the context's rate, which is the
 * stream's unless the browser refused it), each tied to where it is in the line's text. */
function onMarks(msg) {
  const s = hooks.tracks[sessionTracks.get(msg.stream)];
  const m = s && hooks.messages[s.id];
  if (!m || !m.heard) return;
  hooks.counters.marksReceived += 1;
  if (!msg.words || !msg.words.length) return;
  const scale = ctx.sampleRate / (m.sampleRate || ctx.sampleRate);
  const last = m.words.findLast((w) => w.at >= 0);
  let cursor = last ? last.at + last.text.length : 0;
  for (const w of msg.words) {
    // A mark's text is a word of the line as spoken, in order: found from where the last ended.
    let at = m.text.indexOf(w.text, cursor);
    if (at < 0) at = m.text.toLowerCase().indexOf(String(w.text).toLowerCase(), cursor);
    if (at >= 0) cursor = at + w.text.length;
    m.words.push({ text: w.text, start: Math.round(w.start * scale), end: Math.round(w.end * scale), at });
  }
  followCaptions();
}

function onAudio(frame) {
  const track = sessionTracks.get(frame.stream);
  const s = hooks.tracks[track];
  if (!s) {
    hooks.counters.framesUnknownStream += 1;
    return;
  }
  hooks.counters.framesReceived += 1;
  s.frames += 1;
  if (frame.seq !== s.nextSeq) {
    s.inOrder = false;
    hooks.counters.framesOutOfOrder += 1;
  }
  s.nextSeq = frame.seq + 1;
  s.samples += frame.pcm.length;
  const m = hooks.messages[s.id];
  const samples = toFloat(frame.pcm, (m && m.sampleRate) || ctx.sampleRate);
  s.queued += samples.length;
  if (s.message != null) s.frameEnds.push(s.queued);
  player.port.postMessage({ type: "pcm", track, samples }, [samples.buffer]);
}

// --- captions: the spoken word of the current line, in time with playback --------------------
let captionsFrame = 0;
let drawn = { key: null, spans: [] }; // the line's text as drawn: one span per marked word

function followCaptions() {
  if (!captionsFrame) captionsFrame = requestAnimationFrame(tickCaptions);
}

/** Each animation frame while a line plays: where playback is now, and its word. */
function tickCaptions() {
  captionsFrame = 0;
  const m = hooks.channel && hooks.channel.current;
  const s = m && hooks.tracks[m.track];
  if (!m || !s) {
    highlight(null, -1);
    return;
  }
  if (s.clock && m.words.length && ctx) {
    const rate = ctx.sampleRate;
    const now = ctx.currentTime * rate; // output samples rendered so far
    // What leaves the speakers lags what the graph rendered by the output path's latency.
    const latency = ((ctx.baseLatency || 0) + (ctx.outputLatency || 0)) * rate;
    hooks.captions.outputLatencyMs = (latency / rate) * 1000;
    const rendered = Math.min(s.clock.played + (now - s.clock.frame), s.queued);
    const heard = rendered - latency;
    let k = m.wordIndex ?? -1;
    while (k + 1 < m.words.length && m.words[k + 1].start <= heard) k += 1;
    if (k !== (m.wordIndex ?? -1)) {
      m.wordIndex = k;
      const w = m.words[k];
      const due = s.clock.frame + (w.start - s.clock.played); // the output sample its start played at
      const log = hooks.captions.log;
      log.push({ message: m.id, index: k, text: w.text, frame: now, due, offsetMs: ((now - due) / rate) * 1000 });
      if (log.length > 400) log.splice(0, log.length - 400);
      hooks.captions.word = { message: m.id, index: k, text: w.text };
    }
  }
  drawLine(m);
  followCaptions();
}

/** The line's text with its marked words in spans (rebuilt only when marks arrive). */
function drawLine(line) {
  const key = line ? `${line.id}:${line.words.length}` : null;
  if (key !== drawn.key) {
    drawn = { key, spans: [] };
    const nodes = [];
    if (line) {
      let cursor = 0;
      line.words.forEach((w, i) => {
        if (w.at < cursor) return; // not found in the text: nothing to light
        nodes.push(document.createTextNode(line.text.slice(cursor, w.at)));
        const span = document.createElement("span");
        span.className = "w";
        span.textContent = line.text.slice(w.at, w.at + w.text.length);
        drawn.spans[i] = span;
        nodes.push(span);
        cursor = w.at + w.text.length;
      });
      nodes.push(document.createTextNode(line.text.slice(cursor)));
    }
    ui.lineText.replaceChildren(...nodes);
    drawn.lit = null;
  }
  highlight(line, line ? line.wordIndex ?? -1 : -1);
}

function highlight(line, index) {
  if (!line) hooks.captions.word = null;
  const span = line && index >= 0 ? drawn.spans[index] : null;
  if (drawn.lit === span) return;
  if (drawn.lit) drawn.lit.classList.remove("now");
  if (span) {
    span.classList.add("now");
    // Captions show three lines of a long message: the ones with the word being spoken.
    if (config.mode === "captions") span.scrollIntoView({ block: "nearest" });
  }
  drawn.lit = span;
}

function finish(m, state, error) {
  if (TERMINAL.has(m.state)) return;
  m.state = state;
  m.finishedAt = performance.now();
  if (error) m.error = error;
  if (state === "done") hooks.counters.messagesDone += 1;
  else if (state === "cancelled") hooks.counters.messagesCancelled += 1;
  else hooks.counters.messagesFailed += 1;
  setTimeout(render, 3100); // finished rows fade out of the queue
}

function report(code, message) {
  hooks.errors.push({ code, message });
  console.warn(`livevoice: ${code}: ${message}`);
  render();
}

// --- requests -------------------------------------------------------------------------------
function voiceRequest(frames) {
  return new Promise((resolve, reject) => {
    try {
      for (const f of frames) send(f); // back to back: the clip must follow voice.register directly
    } catch (exc) {
      reject(exc);
      return;
    }
    pendingVoice.push({ resolve, reject });
  });
}

function useVoice(voiceId) {
  return voiceRequest([lv.voiceUse(voiceId)]);
}

function clipFormat(name) {
  const ext = (name.split(".").pop() || "").toLowerCase();
  return ["wav", "flac", "ogg", "mp3"].includes(ext) ? ext : undefined;
}

/** Hex SHA-256 of `bytes`; null where the page has no Web Crypto (not a secure context). */
async function sha256Hex(bytes) {
  if (!globalThis.crypto || !crypto.subtle) return null;
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Registers the clip by its SHA-256 first (a clip this tenant sent before needs no upload: a
 * reloaded browser source) and uploads it only when the server answers clip_needed. */
async function sendClip(c, { byHash = true } = {}) {
  if (c.sha256 === undefined) c.sha256 = await sha256Hex(c.bytes);
  const fields = { name: c.name, format: c.format };
  let ready = null;
  // A server older than registering by hash would wait for a clip after it.
  const speaksIt = ((hooks.ready && hooks.ready.features) || []).includes("register_sha256");
  if (byHash && speaksIt && c.sha256) {
    try {
      ready = await voiceRequest([lv.voiceRegister({ ...fields, sha256: c.sha256 })]);
    } catch (exc) {
      if (exc.code !== "clip_needed") throw exc;
    }
  }
  if (!ready) {
    hooks.counters.clipUploads += 1;
    ready = await voiceRequest([lv.voiceRegister(fields), c.bytes]);
  }
  c.voiceId = ready.voice_id;
  return ready;
}

/** Registers a reference clip (a File, Blob or ArrayBuffer) and pins its voice. */
async function register(file, name) {
  const bytes = file instanceof ArrayBuffer ? file : await file.arrayBuffer();
  const fileName = name || file.name || "clip";
  const limit = hooks.ready && hooks.ready.limits.max_clip_bytes;
  if (limit && bytes.byteLength > limit) {
    throw new lv.LivevoiceError("clip_too_large", `the clip is ${bytes.byteLength} bytes; this server takes ${limit}`);
  }
  const c = { bytes, name: fileName.replace(/\.[^.]+$/, ""), format: clipFormat(fileName), voiceId: null };
  hooks.status = "registering";
  render();
  try {
    const ready = await sendClip(c);
    clip = c;
    return ready;
  } finally {
    if (hooks.status === "registering") hooks.status = ws ? "open" : "reconnecting";
    render();
  }
}

/** Speaks `text`; returns the message id (progress in window.livevoice.messages[id]). */
function speak(text) {
  const id = `w${++nextId}`;
  const m = {
    id, text, state: "sending", position: null, stream: null, track: null, end: null,
    skipped: false, serverCancelled: false, error: null,
  };
  hooks.messages[id] = m;
  try {
    send(lv.speak(id, text, { sampleRate: hooks.sampleRate }));
  } catch (exc) {
    finish(m, "failed", { code: exc.code || "client_error", message: exc.message });
  }
  render();
  return id;
}

/** Skips what is playing now (or, if nothing is, the oldest waiting message). In a channel, a
 * speaker skips the channel's current message for every listener; a listener only stops it here. */
function skip() {
  if (isSpeaker) {
    send(lv.channelSkip());
    return hooks.channel.current ? hooks.channel.current.id : null;
  }
  const live = Object.values(hooks.messages).filter((m) => !TERMINAL.has(m.state) && !m.skipped);
  const m = live.find((x) => x.state === "playing") || live[0];
  if (!m) return null;
  m.skipped = true;
  if (m.track != null && player) player.port.postMessage({ type: "skip", track: m.track });
  try {
    send(lv.cancel(m.id));
  } catch {
    // offline: the local skip is all there is to do
  }
  render();
  return m.id;
}

/** The channel's queue controls (a speaker's): pause after the current message, resume, drop
 * every waiting message. What they did comes back as channel.state. */
function pause() {
  send(lv.channelPause());
}

function resume() {
  send(lv.channelResume());
}

function togglePause() {
  if (hooks.channel.paused) resume();
  else pause();
}

function clear() {
  send(lv.channelClear());
}

function cancelAll() {
  for (const m of Object.values(hooks.messages)) {
    if (!TERMINAL.has(m.state) && m.track != null && player) player.port.postMessage({ type: "skip", track: m.track });
    if (!TERMINAL.has(m.state)) m.skipped = true;
  }
  try {
    send(lv.cancel());
  } catch {
    // offline
  }
  render();
}

// --- UI -------------------------------------------------------------------------------------
function render() {
  ui.app.dataset.status = hooks.status;
  const v = hooks.voice;
  ui.status.textContent = `${hooks.status}${v ? ` · voice ${v.name || v.voice_id} (${v.source})` : " · no voice"}`;
  const now = performance.now();
  const rows = Object.values(hooks.messages).filter((m) => !TERMINAL.has(m.state) || now - m.finishedAt < 3000);
  ui.queue.replaceChildren(
    ...rows.map((m) => {
      const li = document.createElement("li");
      li.className = m.state;
      li.dataset.id = m.id;
      const label = document.createElement("span");
      label.className = "state";
      label.textContent = m.state === "failed" && m.error ? m.error.code : m.state;
      li.append(label, document.createTextNode(m.text));
      return li;
    }),
  );
  ui.skip.disabled = !rows.some((m) => !TERMINAL.has(m.state));
  const ch = hooks.channel;
  if (ch) {
    const line = ch.current;
    ui.line.hidden = !line; // an overlay shows nothing between messages
    ui.lineUser.textContent = line && line.user ? line.user : "";
    drawLine(line);
    if (line && line.kind) ui.line.dataset.kind = line.kind;
    else delete ui.line.dataset.kind;
    ui.app.dataset.paused = String(ch.paused);
    if (isSpeaker) {
      ui.channelState.textContent = ch.joined
        ? `#${ch.name}: ${ch.waiting} waiting${ch.paused ? " · paused" : ""}`
        : `#${ch.name}: not joined`;
      ui.pause.textContent = ch.paused ? "Resume" : "Pause";
      ui.pause.disabled = ui.skip.disabled = ui.clear.disabled = !ch.joined;
    }
  }
  if (config.mode === "chat") {
    ui.voice.textContent = v ? `${v.voice_id} · ${v.source} · ${v.ms.toFixed(0)} ms` : "no voice yet";
    if (v) {
      const link = new URL(location.href);
      link.search = "";
      link.searchParams.set("mode", "overlay");
      if (config.channel) link.searchParams.set("channel", config.channel); // plays what this page says
      else link.searchParams.set("voice", v.voice_id);
      if (config.token) link.searchParams.set("token", config.token);
      ui.overlayLink.href = link.href;
      ui.overlayLink.hidden = false;
    }
  }
}

/** The line's look from the URL, as CSS variables (the stylesheet has each mode's defaults). */
function applyStyle() {
  const root = document.documentElement.style;
  const colour = (v) => (/^[0-9a-f]{3,8}$/i.test(v) ? `#${v}` : v);
  const set = (param, variable, property, value = (v) => v) => {
    const raw = params.get(param);
    if (!raw) return;
    const v = value(raw.trim());
    if (CSS.supports(property, v)) root.setProperty(variable, v);
  };
  set("font", "--line-font", "font-family", (v) => `${v}, system-ui, sans-serif`);
  set("size", "--line-size", "font-size", (v) => (/^\d+(\.\d+)?$/.test(v) ? `${Math.min(400, Number(v))}px` : v));
  set("color", "--line-color", "color", colour);
  set("highlight", "--line-highlight", "color", colour);
  set("bg", "--line-bg", "background-color", colour);
}

function init() {
  ui.app.className = config.mode;
  applyStyle();
  document.documentElement.classList.add(config.mode);
  if (channelRole) document.documentElement.classList.add(`channel-${channelRole}`);
  ui.channelControls.hidden = !isSpeaker;
  ui.chat.hidden = config.mode !== "chat";
  ui.volume.value = String(config.volume);
  ui.volume.addEventListener("input", () => setVolume(ui.volume.value));
  const button = (el, action) =>
    el.addEventListener("click", () => {
      try {
        action();
      } catch (exc) {
        report(exc.code || "client_error", exc.message); // offline: the buttons wait for the rejoin
      }
    });
  button(ui.skip, skip);
  button(ui.pause, togglePause);
  button(ui.clear, clear);
  ui.chat.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.text.value.trim();
    if (!text) return;
    if (ctx && ctx.state !== "running") ctx.resume(); // typing is a user gesture
    speak(text);
    ui.text.value = "";
  });
  ui.clip.addEventListener("change", () => {
    const file = ui.clip.files && ui.clip.files[0];
    if (file) register(file).catch((exc) => report(exc.code || "client_error", exc.message));
  });
  if ("BroadcastChannel" in window && config.mode !== "chat" && !config.channel) {
    new BroadcastChannel("livevoice").onmessage = (event) => {
      const d = event.data || {};
      if (d.type === "speak" && typeof d.text === "string") speak(d.text);
      else if (d.type === "skip") skip();
    };
  }
  connect();
}

init();
