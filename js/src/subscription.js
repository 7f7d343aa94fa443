// A channel subscription that outlives connections: exactly-once delivery by offset, or a
// plain "not recovered" / "resync" saying what was lost.
//
// A Subscription remembers the channel's epoch and the offset of the last publication it
// handed to the application.  After every reconnect the client subscribes again with
// `since: {epoch, offset}`; the server then sends every publication missed (`recovered:
// true`) or says they are gone (`recovered: false`: reload from your source of truth).
// Publications at or below the last offset are dropped here, so the application never sees
// one twice, whatever the server or a reconnect repeats.

import { ClientError } from './errors.js';
import { Emitter } from './emitter.js';

/** Publications held while a subscribe awaits its answer (the server sends none then). */
const MAX_EARLY = 10_000;

const CALLBACKS = [
  ['onPublication', 'publication'],
  ['onJoin', 'join'],
  ['onLeave', 'leave'],
  ['onSubscribed', 'subscribed'],
  ['onResync', 'resync'],
  ['onError', 'error'],
];

export class Subscription extends Emitter {
  constructor(client, channel, options = {}) {
    super();
    if (typeof channel !== 'string' || channel === '') {
      throw new TypeError('a channel name is a non-empty string');
    }
    this.client = client;
    this.channel = channel;
    this.joinLeave = Boolean(options.joinLeave);
    /** The epoch and offset of the last publication delivered ('' and 0 before any). */
    this.epoch = '';
    this.offset = 0;
    const since = options.since;
    if (since !== undefined && since !== null) {
      if (typeof since.epoch !== 'string' || !Number.isSafeInteger(since.offset) || since.offset < 0) {
        throw new TypeError('since is {epoch: string, offset: integer >= 0}');
      }
      this.epoch = since.epoch;
      this.offset = since.offset;
    }
    /** 'subscribing', 'subscribed', 'unsubscribed' or 'failed'. */
    this.state = 'subscribing';
    /** The last subscribe's outcome: true when every missed publication was delivered. */
    this.recovered = false;
    this._askedSince = false;
    this._early = null;
    this._waiters = [];
    this._failure = null;
    this._retryTimer = null;
    for (const [option, event] of CALLBACKS) {
      if (typeof options[option] === 'function') this.on(event, options[option]);
    }
  }

  /**
   * Resolves with `{channel, epoch, offset, recovered, wasRecovering}` once subscribed (at
   * once if it is), rejects with the ServerError of a subscribe the server refused.
   */
  ready() {
    if (this.state === 'subscribed') return Promise.resolve(this._context);
    if (this.state === 'failed') return Promise.reject(this._failure);
    if (this.state === 'unsubscribed') return Promise.reject(new ClientError(`unsubscribed from ${this.channel}`));
    return new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
  }

  /** Stop receiving, here and after every future reconnect. */
  unsubscribe() {
    return this.client._unsubscribe(this);
  }

  /** Where to resume: `{epoch, offset}`, e.g. to store and pass as `since` next time. */
  get position() {
    return { epoch: this.epoch, offset: this.offset };
  }

  // -- driven by the client ----------------------------------------------------------------

  get active() {
    return this.state === 'subscribing' || this.state === 'subscribed';
  }

  /** The data of a subscribe request from here; publications wait until it is answered. */
  _request() {
    this.state = 'subscribing';
    this._early = [];
    this._askedSince = this.epoch !== '';
    const request = { channel: this.channel };
    if (this._askedSince) request.since = { epoch: this.epoch, offset: this.offset };
    if (this.joinLeave) request.join_leave = true;
    return request;
  }

  _answered(answer) {
    const epoch = answer?.epoch;
    const offset = answer?.offset;
    if (typeof epoch !== 'string' || !Number.isSafeInteger(offset)) {
      this._early = null;
      this.emit('error', new ClientError(`a malformed subscribe answer for ${this.channel}`));
      return false;
    }
    const early = this._early ?? [];
    this._early = null;
    const recovered = this._askedSince && answer.recovered === true;
    if (!recovered) this.offset = offset; // from the answered position on
    this.epoch = epoch;
    this.state = 'subscribed';
    this.recovered = recovered;
    this._context = { channel: this.channel, epoch, offset, recovered, wasRecovering: this._askedSince };
    this.emit('subscribed', this._context);
    const waiters = this._waiters;
    this._waiters = [];
    for (const { resolve } of waiters) resolve(this._context);
    for (const [off, data] of early) this._publication(off, data);
    return true;
  }

  _failed(error) {
    this.state = 'failed';
    this._failure = error;
    this._early = null;
    this._reject(error);
    this.emit('error', error);
  }

  _disconnected() {
    if (this.state === 'subscribed') this.state = 'subscribing';
    this._early = null;
  }

  _ended(error) {
    if (this.active) {
      // The client was closed: ready() rejects with why from now on.
      this.state = 'failed';
      this._failure = error;
    }
    this._early = null;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._reject(error);
  }

  _reject(error) {
    const waiters = this._waiters;
    this._waiters = [];
    for (const { reject } of waiters) reject(error);
  }

  _publication(offset, data) {
    if (!this.active) return;
    if (this._early !== null) {
      if (this._early.length < MAX_EARLY) this._early.push([offset, data]);
      return; // past the cap: dropped here, and reported below as a gap
    }
    if (offset <= this.offset) return; // delivered already
    if (this.epoch !== '' && offset > this.offset + 1) {
      this.emit('resync', {
        channel: this.channel,
        epoch: this.epoch,
        offset: this.offset,
        reason: 'gap',
      });
    }
    this.offset = offset;
    this.emit('publication', { channel: this.channel, epoch: this.epoch, offset, data });
  }

  _resync(data) {
    if (!this.active || !Number.isSafeInteger(data.offset)) return;
    this.epoch = String(data.epoch ?? '');
    this.offset = data.offset;
    this.emit('resync', {
      channel: this.channel,
      epoch: this.epoch,
      offset: this.offset,
      reason: String(data.reason ?? 'resync'),
    });
  }

  _presence(event, data) {
    if (this.active) this.emit(event, data);
  }
}
