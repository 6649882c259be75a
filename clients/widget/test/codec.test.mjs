// The JS codec against the protocol's conformance vectors: `node --test clients/widget/test/`.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import * as lv from "../livevoice.js";

const VECTORS = JSON.parse(
  readFileSync(new URL("../../../protocol/vectors/v1.json", import.meta.url), "utf8"),
);
const SPEC = readFileSync(new URL("../../../protocol/SPEC.md", import.meta.url), "utf8");

function expectError(fn, code, id) {
  assert.throws(fn, (exc) => {
    assert.ok(exc instanceof lv.LivevoiceError, `not a LivevoiceError: ${exc}`);
    assert.equal(exc.code, code);
    if (id !== undefined) assert.equal(exc.messageId, id);
    return true;
  });
}

for (const c of VECTORS.server_messages) {
  test(`server message: ${c.text.slice(0, 60)}`, () => {
    if ("error" in c) {
      expectError(() => lv.decodeServer(c.text), c.error);
      return;
    }
    const message = lv.decodeServer(c.text);
    assert.deepEqual(message, c.message);
    assert.deepEqual(JSON.parse(lv.encode(message)), c.message);
    // Bytes decode the same as text.
    assert.deepEqual(lv.decodeServer(new TextEncoder().encode(c.text)), c.message);
  });
}

for (const c of VECTORS.audio_frames) {
  test(`audio frame: ${c.name}`, () => {
    const raw = Buffer.from(c.hex, "hex");
    if ("error" in c) {
      expectError(() => lv.decodeAudioFrame(raw), c.error);
      return;
    }
    const frame = lv.decodeAudioFrame(raw);
    assert.equal(frame.stream, c.expect.stream);
    assert.equal(frame.seq, c.expect.seq);
    assert.deepEqual(Array.from(frame.pcm), c.expect.samples);
    assert.deepEqual(Buffer.from(lv.encodeAudioFrame(frame)), raw);
    // An ArrayBuffer and an unaligned view decode alike.
    const shifted = new Uint8Array(raw.length + 1);
    shifted.set(raw, 1);
    assert.deepEqual(lv.decodeAudioFrame(shifted.subarray(1)), frame);
    assert.deepEqual(lv.decodeAudioFrame(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.length)), frame);
  });
}

// Client frames: whatever the server-side state machine accepts as a message must come out of the
// JS encoder as the same JSON; rejections that are about the frame itself (not the session state)
// must be rejected by the JS decoder with the same code (an error a session rule raises, marked
// with its `rule`, is not about the frame).
const FRAME_ERRORS = new Set(["bad_json", "bad_message", "unknown_type"]);
for (const session of VECTORS.client_sessions) {
  test(`client session: ${session.name}`, () => {
    session.frames.forEach((frame, i) => {
      const expect = session.expect[i];
      if (!("text" in frame)) return;
      if ("message" in expect) {
        const decoded = lv.decodeClient(frame.text);
        assert.deepEqual(decoded, expect.message);
        assert.deepEqual(JSON.parse(lv.encode(expect.message)), expect.message);
      } else if (FRAME_ERRORS.has(expect.error) && !expect.rule) {
        expectError(() => lv.decodeClient(frame.text), expect.error, expect.id ?? null);
      }
    });
  });
}

test("builders produce what the server decodes", () => {
  assert.deepEqual(JSON.parse(lv.hello({ client: "w" })), { type: "hello", client: "w", protocol: 1 });
  assert.deepEqual(JSON.parse(lv.speak("m1", "hi", { sampleRate: 48000 })), {
    type: "speak",
    id: "m1",
    text: "hi",
    sample_rate: 48000,
  });
  assert.deepEqual(JSON.parse(lv.speak("m1", "hi")), { type: "speak", id: "m1", text: "hi" });
  assert.deepEqual(JSON.parse(lv.cancel()), { type: "cancel" });
  assert.deepEqual(JSON.parse(lv.speak("m1", "hi", { user: "ann", kind: "sub" })), {
    type: "speak",
    id: "m1",
    text: "hi",
    user: "ann",
    kind: "sub",
  });
  assert.deepEqual(JSON.parse(lv.channelJoin("main", "listen", { sampleRate: 16000 })), {
    type: "channel.join",
    channel: "main",
    role: "listen",
    sample_rate: 16000,
  });
  assert.deepEqual(JSON.parse(lv.channelJoin("main", "listen", { marks: true, id: "j1" })), {
    type: "channel.join",
    channel: "main",
    role: "listen",
    id: "j1",
    marks: true,
  });
  assert.deepEqual(JSON.parse(lv.channelSkip()), { type: "channel.skip" });
  assert.deepEqual(JSON.parse(lv.voiceUse("v_1")), { type: "voice.use", voice_id: "v_1" });
  assert.deepEqual(JSON.parse(lv.voiceDelete("v_1")), { type: "voice.delete", voice_id: "v_1" });
  assert.deepEqual(JSON.parse(lv.voiceRegister({ name: "me", format: "wav" })), {
    type: "voice.register",
    name: "me",
    format: "wav",
  });
  expectError(() => lv.encode({ type: "speak", id: "m1" }), "bad_message", "m1");
  expectError(() => lv.encode({ type: "speak", id: "m1", text: 5 }), "bad_message", "m1");
  expectError(() => lv.encode({ type: "toString" }), "unknown_type");
});

test("defaults are filled in as the Python dataclasses do", () => {
  assert.deepEqual(lv.decodeServer('{"type":"ready","session_id":"s"}'), {
    type: "ready",
    session_id: "s",
    protocol: 1,
    limits: {},
    formats: {},
  });
  const end = lv.decodeServer(
    '{"type":"audio.end","id":"a","stream":1,"frames":0,"samples":0,"duration_ms":0,"ttfa_ms":0,"x":1}',
  );
  assert.equal(end.cancelled, false);
  assert.equal("x" in end, false);
  expectError(() => lv.decodeServer('{"type":"audio.end","id":"a","stream":true}'), "bad_message", "a");
  expectError(() => lv.decodeServer('{"type":"__proto__"}'), "unknown_type");
  expectError(() => lv.decodeServer("null"), "bad_message");
  expectError(() => lv.decodeServer('{"type":1}'), "bad_message");
});

test("voice.deleted: the answer carries the id, the notice says pinned", () => {
  assert.deepEqual(lv.decodeServer('{"type":"voice.deleted","voice_id":"v_1"}'), {
    type: "voice.deleted",
    voice_id: "v_1",
    pinned: false,
  });
  assert.deepEqual(lv.decodeServer('{"type":"voice.deleted","pinned":true}'), {
    type: "voice.deleted",
    pinned: true,
  });
  expectError(() => lv.decodeServer('{"type":"voice.deleted","pinned":"yes"}'), "bad_message");
});

test("the message types match SPEC.md", () => {
  const section = (title) => SPEC.slice(SPEC.indexOf(title), SPEC.indexOf("\n## ", SPEC.indexOf(title) + 1));
  const types = (text) => [...text.matchAll(/^\| `([a-z.]+)` \|/gm)].map((m) => m[1]).sort();
  assert.deepEqual(types(section("## Client → server")), Object.keys(lv.CLIENT_MESSAGES).sort());
  assert.deepEqual(types(section("## Server → client")), Object.keys(lv.SERVER_MESSAGES).sort());
});

test("the error code list matches SPEC.md", () => {
  const table = SPEC.slice(SPEC.indexOf("## Errors"));
  const inSpec = [...table.matchAll(/^\| `([a-z0-9_]+)` \|/gm)].map((m) => m[1]);
  assert.deepEqual([...lv.ERROR_CODES].sort(), [...new Set(inSpec)].sort());
});
