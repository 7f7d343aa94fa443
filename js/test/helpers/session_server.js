// A small in-memory server of the session contract (docs/protocol.md, "Sessions"), over int32
// framing on loopback, for the resumable client's tests: the test decides when connections
// drop, what is lost on the wire, and when replies come, so each path runs deterministically.
// It speaks just enough: hello, session, resume (with takeover), numbered requests (`echo`,
// `later`: answered when the test says, `subscribe` and `unsubscribe`: the session's channels,
// `already_subscribed` as heartbeatd answers, `session_end`), acks both ways, pushes; and
// subscribe refusals on demand (`unavailable`, `rate_limited` with any `retry_after`).

import { randomBytes } from 'node:crypto';
import net from 'node:net';

import { encodeInt32, Int32Decoder } from '../../src/framing.js';

const HELLO = { type: 'hello', data: { server: 'fake-sessions', heartbeat: { interval: 60, timeout: 180 }, max_frame_bytes: 1 << 20 } };

export class SessionServer {
  constructor({ sessions = true } = {}) {
    this.sessionsEnabled = sessions;
    this.sessions = new Map();
    this.sockets = new Set();
    /** Every message received, in order: `{conn, message}` (conn counts connections from 1). */
    this.log = [];
    this.connections = 0;
    /** Replay everything on resume, ignoring the client's ack (to test the client's dedupe). */
    this.replayAll = false;
    /** Numbered requests of these types are dropped as if lost on the wire (not counted). */
    this.loseOnWire = new Set();
    /** The next resume's replay starts with a seq that skips some: the client must resume again. */
    this.gapOnce = false;
    /** Refuse this many session starts with `unavailable` (the cluster's Redis is down). */
    this.unavailable = 0;
    /** Answer this many resumes `resumed: false, reason: unavailable` (Infinity: every one). */
    this.resumeUnavailable = 0;
    /** Answer this many subscribes `unavailable` (the cluster's broker is down; Infinity: all). */
    this.subscribeUnavailable = 0;
    /**
     * Answer the next subscribes `rate_limited` (after any `subscribeUnavailable`), one per
     * entry, taken in order: the entry is the error's `retry_after` (undefined: none).
     */
    this.subscribeRateLimited = [];
    /** Take this many subscribes (subscribed, acked) and never answer them (Infinity: all). */
    this.subscribeSilent = 0;
    this.server = net.createServer((socket) => this._accept(socket));
  }

  async start() {
    await new Promise((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    this.url = `tcp://127.0.0.1:${this.server.address().port}`;
    return this;
  }

  async stop() {
    for (const s of this.sockets) s.destroy();
    await new Promise((resolve) => this.server.close(resolve));
  }

  /** Drop every client connection at once (sessions stay, detached). */
  cut() {
    for (const s of this.sockets) s.destroy();
  }

  /** A restart: every session is forgotten. */
  forget() {
    this.sessions.clear();
  }

  /** The only session (most tests have one client). */
  get session() {
    return [...this.sessions.values()][0];
  }

  /** A numbered push in `session`, written now if attached, kept until acked. */
  push(session, type, data) {
    if (type === 'subscription_lost') session.channels.delete(data.channel); // not restored
    this._numbered(session, { type, data });
  }

  /** Answer every `later` request held so far (numbered replies, in order). */
  answerLater(session) {
    const held = session.later.splice(0);
    for (const m of held) this._numbered(session, { type: m.type, id: m.id, data: m.data, ack: session.inHigh });
  }

  /** Answer every subscribe held so far (subscribeSilent), in order. */
  answerSubscribes(session) {
    for (const m of session.heldSubscribes.splice(0)) {
      this._numbered(session, { type: m.type, id: m.id, data: { channel: m.data.channel, epoch: 'e1', offset: 0 }, ack: session.inHigh });
    }
  }

  /** Answer every subscribe held so far with error `code` (the channel is not subscribed). */
  failSubscribes(session, code) {
    for (const m of session.heldSubscribes.splice(0)) {
      session.channels.delete(m.data.channel);
      this._numbered(session, { type: 'error', id: m.id, error: { code, message: 'unsubscribed meanwhile' }, ack: session.inHigh });
    }
  }

  /** Say goaway on the session's connection (the server drains). */
  goaway(session, reconnectAfter = 0) {
    this._write(session.socket, { type: 'goaway', data: { reason: 'shutdown', reconnect_after: reconnectAfter } });
  }

  /** Send `session_taken_over` to the session's live connection and close it. */
  takeOver(session) {
    const socket = session.socket;
    session.socket = null;
    if (socket) {
      this._write(socket, { type: 'error', error: { code: 'session_taken_over', message: 'resumed elsewhere' } });
      socket.end();
    }
  }

  _accept(socket) {
    const conn = ++this.connections;
    this.sockets.add(socket);
    socket.setNoDelay(true); // what the test writes goes now (not after the client's delayed ack)
    socket.on('error', () => {});
    socket.on('close', () => {
      this.sockets.delete(socket);
      for (const s of this.sessions.values()) if (s.socket === socket) s.socket = null;
    });
    const state = { session: null };
    const decoder = new Int32Decoder(1 << 20);
    socket.on('data', (chunk) => {
      for (const body of decoder.feed(chunk)) {
        if (socket.destroyed) return;
        const message = JSON.parse(new TextDecoder().decode(body));
        this.log.push({ conn, message, at: performance.now() });
        this._message(socket, state, message);
      }
    });
    this._write(socket, HELLO);
  }

  _write(socket, message) {
    if (socket && !socket.destroyed) socket.write(encodeInt32(JSON.stringify(message)));
  }

  _numbered(session, message) {
    session.outSeq += 1;
    const numbered = { ...message, seq: session.outSeq };
    session.out.push(numbered);
    this._write(session.socket, numbered);
  }

  _rateLimited() {
    const retryAfter = this.subscribeRateLimited.shift();
    const error = { code: 'rate_limited', message: 'too many subscribes' };
    if (retryAfter !== undefined) error.retry_after = retryAfter;
    return error;
  }

  _message(socket, state, m) {
    const reply = (data) => this._write(socket, { type: m.type, id: m.id, data });
    const error = (code, message = code) => this._write(socket, { type: 'error', id: m.id, error: { code, message } });
    if (m.type === 'ping') return this._write(socket, { type: 'pong', id: m.id });
    if (m.type === 'session') {
      if (!this.sessionsEnabled) return error('unknown_type', 'no handler for session');
      if (this.unavailable > 0) {
        this.unavailable -= 1;
        return error('unavailable', "the cluster's session store is unreachable");
      }
      if (state.session) return error('session_exists');
      const session = {
        id: randomBytes(8).toString('hex'),
        key: randomBytes(16).toString('base64url'),
        expiry: m.data?.expiry ?? 120,
        outSeq: 0,
        out: [],
        inHigh: 0,
        later: [],
        channels: new Set(),
        heldSubscribes: [],
        acks: [],
        socket,
      };
      this.sessions.set(session.id, session);
      state.session = session;
      return reply({ session: session.id, key: session.key, expiry: session.expiry });
    }
    if (m.type === 'resume') {
      if (this.resumeUnavailable > 0) {
        this.resumeUnavailable -= 1;
        return reply({ resumed: false, reason: 'unavailable' });
      }
      const session = this.sessions.get(m.data?.session);
      if (!session) return reply({ resumed: false, reason: 'unknown_session' });
      if (session.key !== m.data.key) return reply({ resumed: false, reason: 'bad_key' });
      if (session.socket && session.socket !== socket) this.takeOver(session);
      session.socket = socket;
      state.session = session;
      if (!this.replayAll) session.out = session.out.filter((o) => o.seq > m.data.ack);
      reply({ resumed: true, session: session.id, ack: session.inHigh, replay: session.out.length, expiry: session.expiry });
      if (this.gapOnce) {
        this.gapOnce = false;
        this._write(socket, { type: 'bogus', seq: session.outSeq + 5 }); // a seq skipped
      }
      for (const o of session.out) this._write(socket, o);
      return undefined;
    }
    const session = state.session;
    if (m.type === 'ack') {
      if (session) {
        session.acks.push(m.data.seq);
        session.out = session.out.filter((o) => o.seq > m.data.seq);
      }
      return undefined;
    }
    if (session === null || m.seq === undefined) {
      // Without a session: a plain subscribe, else a connection-level echo.
      if (m.type !== 'subscribe') return reply(m.data);
      if (this.subscribeUnavailable > 0) {
        this.subscribeUnavailable -= 1;
        return error('unavailable', "the cluster's broker is unreachable");
      }
      if (this.subscribeRateLimited.length > 0) return this._write(socket, { type: 'error', id: m.id, error: this._rateLimited() });
      return reply({ channel: m.data.channel, epoch: 'e1', offset: 0 });
    }
    if (m.seq <= session.inHigh) return undefined; // a duplicate: its reply is in the stream
    if (m.seq > session.inHigh + 1) {
      error('bad_seq', `expected ${session.inHigh + 1}`);
      return socket.end();
    }
    if (state.deaf || this.loseOnWire.has(m.type)) {
      state.deaf = true; // a stream loses everything after what it lost
      return undefined;
    }
    session.inHigh = m.seq;
    const answer = (data, type = m.type) => {
      if (m.id !== undefined) this._numbered(session, { type, id: m.id, data, ack: session.inHigh });
    };
    const answerError = (code, message) => {
      if (m.id !== undefined) this._numbered(session, { type: 'error', id: m.id, error: { code, message }, ack: session.inHigh });
    };
    switch (m.type) {
      case 'later':
        session.later.push(m);
        return undefined;
      case 'subscribe': {
        const channel = m.data.channel;
        if (this.subscribeUnavailable > 0) {
          this.subscribeUnavailable -= 1;
          return answerError('unavailable', "the cluster's broker is unreachable");
        }
        if (this.subscribeRateLimited.length > 0) {
          if (m.id !== undefined) this._numbered(session, { type: 'error', id: m.id, error: this._rateLimited(), ack: session.inHigh });
          return undefined;
        }
        if (session.channels.has(channel)) return answerError('already_subscribed', `already subscribed to ${channel}`);
        session.channels.add(channel);
        if (this.subscribeSilent > 0) {
          this.subscribeSilent -= 1;
          session.heldSubscribes.push(m); // a server that does not answer (slow, a bug, or hostile)
          return undefined;
        }
        return answer({ channel, epoch: 'e1', offset: 0, recovered: false });
      }
      case 'unsubscribe':
        if (!session.channels.delete(m.data.channel)) return answerError('not_subscribed', `not subscribed to ${m.data.channel}`);
        return answer({ channel: m.data.channel });
      case 'session_end':
        answer({});
        this.sessions.delete(session.id);
        state.session = null;
        return undefined;
      default:
        return answer(m.data);
    }
  }
}
