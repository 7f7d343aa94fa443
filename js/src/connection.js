// One connection to a heartbeatd server: the hello, requests matched by id, pushes, the
// heartbeat and goaway.  The Client (client.js) makes a new one for every (re)connect.
//
// Every request ends: it resolves with the reply's `data`, or rejects with a ServerError (an
// error envelope), a TimeoutError, or a ConnectionError when the connection is lost first.
// The heartbeat takes its terms from the hello (clamped, see backoff.js): the connection
// answers pings, pings a quiet server, and aborts one silent past the timeout, so a half-open
// connection is found from this side too.

import { heartbeatTerms, retryAfterDelay } from './backoff.js';
import { decodeMessage, encodeMessage } from './envelope.js';
import { ConnectionError, MessageTooLargeError, ServerError, TimeoutError } from './errors.js';
import { HEARTBEAT } from './framing.js';
import { openTransport } from './transport.js';

/** Heartbeat terms until a hello says otherwise, where none may come (a seed server). */
const SEED_HEARTBEAT = Object.freeze({ interval: 10_000, timeout: 30_000 });
const PING = encodeMessage('ping');
const encoder = new TextEncoder();

export const now = () => globalThis.performance?.now?.() ?? Date.now();

const isObject = (value) => value !== null && typeof value === 'object' && !Array.isArray(value);

/** A ServerError from an error envelope's `{"code", "message", "retry_after"?}`. */
export function serverError(error) {
  const e = isObject(error) ? error : {};
  return new ServerError(String(e.code ?? 'unknown'), String(e.message ?? ''), retryAfterDelay(e.retry_after));
}

export class Connection {
  /**
   * `events`: `push(type, data)`, `goaway(data)`, `error(error)` (a malformed frame, an error
   * envelope that answers no request) and `closed(reason)`, called once at the end.  A
   * resumable client adds `nextId()` (ids unique across its connections), `sequenced(message)`
   * (a message with a `seq` or an `ack`, or an `ack` message: false drops it) and
   * `reply(message)` (a reply to a request it holds itself: true when it took it).
   */
  constructor(target, options, events) {
    this.target = target;
    this.options = options;
    this.events = events;
    this.transport = null;
    /** The server's hello `data`, once received. */
    this.hello = null;
    /** Who the server says we are, once it accepted our token. */
    this.identity = null;
    /** Past the hello (and the auth): requests may be sent (stays true once closed). */
    this.ready = false;
    this.closed = false;
    /** The server said goaway: finish what is in flight, start nothing new. */
    this.draining = false;
    /** Why the connection ended (an Error), once it has. */
    this.closeReason = null;
    this.lastReceived = now();
    this._pending = new Map();
    this._nextId = 0;
    this._ids = events.nextId ?? (() => ++this._nextId);
    /** Items held after a `hold` request's reply, until `release()` (see request()). */
    this._held = null;
    this._bareValues = options.framing === 'seed' && target.kind === 'stream';
    // A server of the seed's own kind sends no hello: in seed framing, do not wait for one.
    this._expectHello = !this._bareValues;
    this._bareWaiters = []; // seed: replies to bare values come back in order
    this._idleWaiters = [];
    this._closedWaiters = [];
    this._serverError = null; // an unanswered error envelope: the likely reason for a close
    this._terms = null;
    this._heartbeat = null;
    this._pingOutstanding = false;
    this._helloArrived = null;
    this._hello = new Promise((resolve, reject) => {
      this._helloArrived = { resolve, reject };
    });
    this._hello.catch(() => {}); // its waiter (open) has it; never "unhandled"
  }

  /**
   * Connect, wait for the hello and, with a `token`, for the server to accept it; all within
   * `options.timeout` ms.  Rejects with a ConnectionError, TimeoutError or ServerError (the
   * connection is then closed).
   */
  async open(token) {
    const ms = this.options.timeout;
    const started = now();
    let timer;
    const deadline = new Promise((resolve, reject) => {
      timer = setTimeout(
        () => reject(new TimeoutError(`no connection to ${this.target.href} within ${ms} ms`)),
        ms,
      );
    });
    try {
      const opening = openTransport(this.target, this.options, {
        item: (item) => this._item(item),
        closed: (error) => this._closed(error),
      });
      // A transport that opens after we gave up is closed at once.
      opening.then((transport) => this.closed && transport.abort(this.closeReason), () => {});
      this.transport = await Promise.race([opening, deadline]);
      this.lastReceived = now();
      if (!this._expectHello) {
        this._startHeartbeat(SEED_HEARTBEAT);
      } else {
        await Promise.race([this._hello, deadline]);
      }
      const auth = this.hello?.auth === 'required';
      if (typeof token === 'string' && token !== '') {
        const left = Math.max(ms - (now() - started), 1);
        const answer = await this.request('auth', { token }, { timeout: left });
        if (isObject(answer) && typeof answer.identity === 'string') this.identity = answer.identity;
      } else if (auth) {
        throw new ServerError('unauthenticated', 'the server requires a token (options.token or getToken)');
      }
      this.ready = true;
      return this;
    } catch (error) {
      this.abort(error);
      throw this.closeReason ?? error;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Ready and not draining: a new request may go out on this connection. */
  get usable() {
    return this.ready && !this.closed && !this.draining;
  }

  get pendingRequests() {
    return this._pending.size + this._bareWaiters.length;
  }

  // -- sending -----------------------------------------------------------------------------

  /**
   * With `hold`, whatever arrives after the reply waits (in order) until `release()`: the
   * client handles a session or resume answer before the messages that follow it.
   */
  request(type, data, { timeout, hold = false } = {}) {
    const ms = timeout ?? this.options.timeout;
    if (this.closed || this.transport === null) {
      return Promise.reject(new ConnectionError('the connection is closed'));
    }
    const id = this._ids();
    let text;
    try {
      text = this._checked(encodeMessage(type, data, id));
    } catch (error) {
      return Promise.reject(error);
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new TimeoutError(`no reply to ${JSON.stringify(type)} within ${ms} ms`));
        this._maybeIdle();
      }, ms);
      this._pending.set(id, { resolve, reject, timer, hold });
      this.transport.send(text);
    });
  }

  /** Write a text as it is (a session message, numbered and encoded by the client). */
  sendText(text) {
    if (this.closed || this.transport === null) throw new ConnectionError('the connection is closed');
    this.transport.send(this._checked(text));
  }

  /** Handle the items held since a `hold` request's reply, then the rest as they come. */
  release() {
    const held = this._held;
    this._held = null;
    if (held === null) return;
    for (let i = 0; i < held.length; i++) {
      if (this.closed) return;
      this._item(held[i]);
      if (this._held !== null) {
        // Another hold began: keep the rest behind it, in order.
        this._held.push(...held.slice(i + 1));
        return;
      }
    }
  }

  /** Fire and forget (no id, so no reply). */
  send(type, data) {
    if (this.closed || this.transport === null) throw new ConnectionError('the connection is closed');
    this.transport.send(this._checked(encodeMessage(type, data)));
  }

  /** Seed framing: send a bare JSON value; the next bare value received is its reply. */
  requestValue(value, { timeout } = {}) {
    const ms = timeout ?? this.options.timeout;
    if (this.closed || this.transport === null) {
      return Promise.reject(new ConnectionError('the connection is closed'));
    }
    let text;
    try {
      text = this._checked(JSON.stringify(value));
    } catch (error) {
      return Promise.reject(error);
    }
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject, timer: null };
      waiter.timer = setTimeout(() => {
        const i = this._bareWaiters.indexOf(waiter);
        if (i >= 0) this._bareWaiters.splice(i, 1);
        reject(new TimeoutError(`no reply to a bare value within ${ms} ms`));
        this._maybeIdle();
      }, ms);
      this._bareWaiters.push(waiter);
      this.transport.send(text);
    });
  }

  _checked(text) {
    const limit = this.hello?.max_frame_bytes;
    // A UTF-8 byte is at least a third of a UTF-16 unit's worth: measure only near the limit.
    if (Number.isSafeInteger(limit) && text.length * 3 > limit) {
      const size = encoder.encode(text).length;
      if (size > limit) throw new MessageTooLargeError(size, limit);
    }
    return text;
  }

  /** Resolves once no request waits for its reply (at once if none does). */
  whenIdle() {
    if (this.pendingRequests === 0 || this.closed) return Promise.resolve();
    return new Promise((resolve) => this._idleWaiters.push(resolve));
  }

  _maybeIdle() {
    if (this.pendingRequests === 0 && this._idleWaiters.length) {
      const waiters = this._idleWaiters;
      this._idleWaiters = [];
      for (const resolve of waiters) resolve();
    }
  }

  // -- closing -----------------------------------------------------------------------------

  /** Close politely; resolves once closed (aborting after `graceMs` if the peer lingers). */
  close(graceMs = 2000) {
    if (this.closed) return Promise.resolve();
    const done = new Promise((resolve) => this._closedWaiters.push(resolve));
    if (this.transport === null) {
      this.abort(new ConnectionError('closed before it opened'));
      return done;
    }
    this.transport.close();
    const timer = setTimeout(() => this.abort(new ConnectionError('the close timed out')), graceMs);
    return done.finally(() => clearTimeout(timer));
  }

  /** Drop the connection at once, recording `error` as the reason. */
  abort(error) {
    if (this.closed) return;
    this.closeReason ??= error;
    if (this.transport !== null) {
      this.transport.abort(error);
    } else {
      this._closed(error);
    }
  }

  _closed(error) {
    if (this.closed) return;
    this.closed = true;
    if (this._heartbeat !== null) clearInterval(this._heartbeat);
    this._heartbeat = null;
    let reason = this.closeReason ?? this._serverError ?? error;
    if (!(reason instanceof Error)) reason = new ConnectionError('the server closed the connection');
    this.closeReason = reason;
    const pending = [...this._pending.values(), ...this._bareWaiters];
    this._pending.clear();
    this._bareWaiters = [];
    for (const { reject, timer } of pending) {
      clearTimeout(timer);
      reject(new ConnectionError(`the connection was lost before the reply: ${reason.message}`, { cause: reason }));
    }
    this._helloArrived.reject(reason);
    this._maybeIdle();
    const waiters = this._idleWaiters.concat(this._closedWaiters);
    this._idleWaiters = [];
    this._closedWaiters = [];
    for (const resolve of waiters) resolve();
    this.events.closed(reason);
  }

  // -- receiving ---------------------------------------------------------------------------

  _item(item) {
    if (this.closed) return;
    this.lastReceived = now();
    if (this._held !== null) {
      this._held.push(item);
      return;
    }
    if (item === HEARTBEAT) {
      // The answer to our own token is not answered again (two peers must not bounce tokens).
      if (this._pingOutstanding) this._pingOutstanding = false;
      else this.transport.sendToken();
      return;
    }
    let message;
    try {
      message = decodeMessage(item, this._bareValues);
    } catch (error) {
      this.events.error(error);
      return;
    }
    this._message(message);
  }

  _message(message) {
    const { type, id, data, error, bare } = message;
    if (bare) {
      const waiter = this._bareWaiters.shift();
      if (waiter !== undefined) {
        clearTimeout(waiter.timer);
        waiter.resolve(data);
        this._maybeIdle();
      } else {
        this.events.push('message', data);
      }
      return;
    }
    if (type === 'hello') {
      // A second hello is not a push: the first one set the terms.
      if (this.hello === null && isObject(data)) this._helloReceived(data);
      return;
    }
    if (this.hello === null && this._expectHello) {
      // Before the hello only a refusal (e.g. too_many_connections) is expected.
      if (type === 'error') this._serverError = serverError(error);
      return;
    }
    const numbered = message.seq !== undefined || message.ack !== undefined || (type === 'ack' && id === undefined);
    if (numbered && this.events.sequenced !== undefined && !this.events.sequenced(message)) return;
    if (id !== undefined && this._pending.has(id)) {
      const entry = this._pending.get(id);
      this._pending.delete(id);
      clearTimeout(entry.timer);
      if (entry.hold) this._held = [];
      if (type === 'error') entry.reject(serverError(error));
      else entry.resolve(data);
      this._maybeIdle();
      return;
    }
    if (id !== undefined && this.events.reply !== undefined && this.events.reply(message)) return;
    if (id !== undefined && id !== null && type !== 'ping' && type !== 'pong') {
      // A reply whose request is gone (it timed out): late, and not a push.
      return;
    }
    switch (type) {
      case 'ping':
        this.transport.send(encodeMessage('pong', undefined, id));
        return;
      case 'pong':
        this._pingOutstanding = false;
        return;
      case 'goaway':
        if (!this.draining) {
          this.draining = true;
          this.events.goaway(isObject(data) ? data : {});
        }
        return;
      case 'error': {
        const e = serverError(error);
        this._serverError = e; // the server closes after most of these: that is why
        this.events.error(e);
        return;
      }
      default:
        this.events.push(type, data);
    }
  }

  _helloReceived(hello) {
    this.hello = hello;
    const terms = heartbeatTerms(hello.heartbeat, this._expectHello ? null : SEED_HEARTBEAT);
    if (terms !== null) this._startHeartbeat(terms);
    this._helloArrived.resolve(hello);
  }

  // -- heartbeat ---------------------------------------------------------------------------

  _startHeartbeat(terms) {
    if (this._heartbeat !== null) clearInterval(this._heartbeat);
    this._terms = terms;
    this._heartbeat = setInterval(() => this._beat(), terms.interval);
  }

  _beat() {
    if (this.closed) return;
    const silent = now() - this.lastReceived;
    if (silent > this._terms.timeout) {
      this.abort(
        new ConnectionError(
          `the server was silent for ${(silent / 1000).toFixed(1)} s (heartbeat timeout ${this._terms.timeout / 1000} s)`,
        ),
      );
    } else if (silent >= this._terms.interval) {
      this._pingOutstanding = true;
      if (this._bareValues) this.transport.sendToken();
      else this.transport.send(PING);
    }
  }
}
