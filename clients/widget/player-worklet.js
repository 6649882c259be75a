// AudioWorkletProcessor "livevoice-player": plays the PCM of consecutive messages back to back.
//
// The main thread posts, per message, under a track number that grows with each message:
// {type:"start", track}, then {type:"pcm", track, samples: Float32Array} per audio frame, then
// {type:"end", track} once audio.end arrived; {type:"skip", track} drops a message at once. Tracks
// play strictly in the order they started. A small jitter buffer holds the start of each message
// until `prebufferMs` of it (or all of it) is queued; after that, running dry before the message's
// end is an underrun: counted, reported, and the buffer refills before playing on. Silence between
// messages (the next one not synthesized yet) is not an underrun. The context runs at the
// stream's sample rate, so no resampling happens here.
//
// Reports posted back: {type:"started", track, frame}, {type:"underrun", track, frame},
// {type:"played", track, played, frame} about every 50 ms while a track plays (its samples played
// so far: where a channel listener resumes from, and what captions follow),
// {type:"finished", track, played, frame, skipped}, where `frame` counts output samples since the
// processor started (a message that starts on the frame the previous one finished is gapless).

class LivevoicePlayer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.prebuffer = Math.max(1, Math.round(((opts.prebufferMs ?? 60) / 1000) * sampleRate));
    this.order = []; // tracks in play order, current first
    this.tracks = new Map(); // track -> state
    this.finished = 0; // tracks finish in order: anything at or below this one is gone
    this.frame = 0; // output samples so far
    this.reportEvery = Math.round(sampleRate / 20);
    this.sinceReport = 0;
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  state(track) {
    if (track <= this.finished) return null; // frames still in flight after a skip
    let st = this.tracks.get(track);
    if (!st) {
      st = { chunks: [], offset: 0, buffered: 0, ended: false, started: false, waiting: true, played: 0, skipped: false };
      this.tracks.set(track, st);
      this.order.push(track);
    }
    return st;
  }

  drop(st) {
    st.skipped = true;
    st.ended = true;
    st.chunks = [];
    st.offset = 0;
    st.buffered = 0;
  }

  onMessage(msg) {
    const st = msg.track === undefined ? null : this.state(msg.track);
    switch (msg.type) {
      case "pcm":
        if (!st || st.ended) return;
        st.chunks.push(msg.samples);
        st.buffered += msg.samples.length;
        break;
      case "end":
        if (st) st.ended = true;
        break;
      case "skip":
        if (st) this.drop(st);
        break;
      case "reset":
        for (const t of this.tracks.values()) this.drop(t);
        break;
    }
  }

  reportPlayed(n) {
    this.sinceReport += n;
    const track = this.order[0];
    const st = track === undefined ? null : this.tracks.get(track);
    if (st && st.started && this.sinceReport >= this.reportEvery) {
      this.sinceReport = 0;
      // `frame`: the output sample count at the end of this block, where `played` was reached
      // (a caption on the main thread extrapolates the position from it with the audio clock).
      this.port.postMessage({ type: "played", track, played: st.played, frame: this.frame + n });
    }
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    let i = 0;
    while (i < out.length && this.order.length) {
      const track = this.order[0];
      const st = this.tracks.get(track);
      if (st.buffered === 0 && st.ended) {
        this.order.shift();
        this.tracks.delete(track);
        this.finished = Math.max(this.finished, track);
        this.port.postMessage({ type: "finished", track, played: st.played, frame: this.frame + i, skipped: st.skipped });
        continue;
      }
      if (st.waiting) {
        // Hold until a cushion is queued, or everything is.
        if (st.buffered < this.prebuffer && !st.ended) break;
        st.waiting = false;
      }
      if (st.buffered === 0) {
        // Started, not ended, nothing queued: the network or the synthesizer fell behind.
        st.waiting = true;
        this.port.postMessage({ type: "underrun", track, frame: this.frame + i });
        break;
      }
      if (!st.started) {
        st.started = true;
        this.port.postMessage({ type: "started", track, frame: this.frame + i });
      }
      const chunk = st.chunks[0];
      const n = Math.min(out.length - i, chunk.length - st.offset);
      out.set(chunk.subarray(st.offset, st.offset + n), i);
      i += n;
      st.offset += n;
      st.buffered -= n;
      st.played += n;
      if (st.offset === chunk.length) {
        st.chunks.shift();
        st.offset = 0;
      }
    }
    this.reportPlayed(out.length);
    out.fill(0, i);
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    this.frame += out.length;
    return true;
  }
}

registerProcessor("livevoice-player", LivevoicePlayer);
