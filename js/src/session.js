// A resumable session's bookkeeping (docs/protocol.md, "Sessions"), with no socket and no
// clock of its own: the Client (client.js) feeds it what it sends and receives, and it says
// what to resend, what is a duplicate and when to ack.
//
// Outbound, every session message gets the next `seq` and stays in the resend buffer until the
// server acknowledges it (cumulatively: a piggybacked `"ack": M` on a numbered reply, or an
// `ack` message); after a reconnect the client resends, in order and unchanged, what the
// server's resume answer says it never received.  Inbound, a message at or below the last
// server seq received is a duplicate (a replay of what arrived already) and is dropped; the
// client acks cumulatively after `ackEvery` messages or `ackDelay` ms after the first unacked
// one, whichever comes first, and before a clean close.  The timers are injected, so the unit
// tests step them by hand.

/** The contract's batching: an ack after 32 messages, or 200 ms after the first unacked one. */
export const ACK_EVERY = 32;
export const ACK_DELAY = 200;

export class SessionState {
  /**
   * `sendAck(seq)` writes `{"type": "ack", "data": {"seq": seq}}` (it is called only while
   * attached); `setTimer(fn, ms)` / `clearTimer(handle)` default to the global timers.
   */
  constructor({ sendAck, setTimer = setTimeout, clearTimer = clearTimeout, ackEvery = ACK_EVERY, ackDelay = ACK_DELAY } = {}) {
    this._sendAck = sendAck;
    this._setTimer = setTimer;
    this._clearTimer = clearTimer;
    this.ackEvery = ackEvery;
    this.ackDelay = ackDelay;
    /** The server's session id and key (null until started); the key is never logged. */
    this.id = null;
    this.key = null;
    /** The granted expiry, seconds. */
    this.expiry = null;
    /** True while a connection carries the session. */
    this.attached = false;
    this._reset();
  }

  _reset() {
    /** The seq the next outbound message gets. */
    this.nextSeq = 1;
    /** The highest client seq the server acknowledged. */
    this.serverAck = 0;
    /** [{seq, text}], in seq order: sent (or to send) and not acknowledged by the server. */
    this.buffer = [];
    /** The highest server seq received (delivered or dropped as a duplicate). */
    this.received = 0;
    /** The highest server seq we acknowledged (an ack message, or a resume's `ack`). */
    this.acked = 0;
    this._cancelAckTimer();
  }

  get started() {
    return this.id !== null;
  }

  /** The answer to `session` arrived: numbering starts at 1 both ways. */
  start({ session, key, expiry }) {
    this._reset();
    this.id = session;
    this.key = key;
    this.expiry = expiry;
    this.attached = true;
  }

  /** The session is gone (lost, taken over, ended): forget it all. */
  forget() {
    this._reset();
    this.id = null;
    this.key = null;
    this.expiry = null;
    this.attached = false;
  }

  // -- outbound ----------------------------------------------------------------------------

  /** Number a message: `encode(seq)` gives its text, kept for a resend until acknowledged. */
  number(encode) {
    const seq = this.nextSeq;
    const text = encode(seq); // may throw (too large): then the seq is not used
    this.nextSeq = seq + 1;
    this.buffer.push({ seq, text });
    return { seq, text };
  }

  /**
   * The message numbered last could not be written (the connection closed under it): the
   * caller fails it, so its copy must never be resent (the server would run what the
   * application was told had failed), and its seq goes to the next message (no gap).
   */
  unnumber(seq) {
    const last = this.buffer.at(-1);
    if (last === undefined || last.seq !== seq || seq !== this.nextSeq - 1) return false;
    this.buffer.pop();
    this.nextSeq = seq;
    return true;
  }

  /**
   * The server acknowledged every client seq up to `seq`: drop those copies.  An ack below a
   * previous one changes nothing; one above what was sent is the server's error, ignored
   * (false).
   */
  serverAcked(seq) {
    if (!Number.isSafeInteger(seq) || seq < 0 || seq >= this.nextSeq) return false;
    if (seq <= this.serverAck) return true;
    this.serverAck = seq;
    let drop = 0;
    while (drop < this.buffer.length && this.buffer[drop].seq <= seq) drop++;
    if (drop > 0) this.buffer.splice(0, drop);
    return true;
  }

  /** The texts to resend, in order, after a resume answered with the server's `ack`. */
  resendAfter(ack) {
    this.serverAcked(ack);
    return this.buffer.map((entry) => entry.text);
  }

  // -- inbound -----------------------------------------------------------------------------

  /**
   * A numbered message arrived: 'new' (deliver it), 'duplicate' (seq at or below the last
   * received: drop it) or 'gap' (a seq skipped: the stream is broken, resume to repair it).
   */
  receive(seq) {
    if (seq <= this.received) return 'duplicate';
    if (seq !== this.received + 1) return 'gap';
    this.received = seq;
    if (this.attached) {
      if (this.received - this.acked >= this.ackEvery) this.flushAck();
      else if (this._ackTimer === null) {
        this._ackTimer = this._setTimer(() => {
          this._ackTimer = null;
          this.flushAck();
        }, this.ackDelay);
      }
    }
    return 'new';
  }

  /** Ack everything received now, if anything is unacked (before a clean close, too). */
  flushAck() {
    this._cancelAckTimer();
    if (!this.attached || this.received <= this.acked) return;
    this.acked = this.received;
    this._sendAck(this.received);
  }

  /** The connection is gone: no ack can go out until a resume (which carries one). */
  detach() {
    this.attached = false;
    this._cancelAckTimer();
  }

  /** A resume is sent with `ack: received`: that counts as acknowledging. */
  resuming() {
    this.acked = this.received;
    return this.received;
  }

  /** The resume succeeded: acks flow again. */
  reattach() {
    this.attached = true;
  }

  _cancelAckTimer() {
    if (this._ackTimer !== undefined && this._ackTimer !== null) this._clearTimer(this._ackTimer);
    this._ackTimer = null;
  }
}
