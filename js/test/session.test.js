// A resumable session's bookkeeping (src/session.js), with hand-stepped timers: outbound
// numbering, the resend buffer the server's acks trim, inbound dedupe, and ack batching
// (32 messages or 200 ms after the first unacked one, and before a clean close).

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { decodeMessage, encodeMessage } from '../src/envelope.js';
import { ACK_DELAY, ACK_EVERY, SessionState } from '../src/session.js';

/** Timers that fire only when the test says how much time passed. */
class FakeTimers {
  constructor() {
    this.now = 0;
    this.timers = new Map();
    this.next = 1;
  }

  set = (fn, ms) => {
    const handle = this.next++;
    this.timers.set(handle, { fn, at: this.now + ms });
    return handle;
  };

  clear = (handle) => {
    this.timers.delete(handle);
  };

  advance(ms) {
    const until = this.now + ms;
    for (;;) {
      const due = [...this.timers.entries()].filter(([, t]) => t.at <= until).sort((a, b) => a[1].at - b[1].at);
      if (due.length === 0) break;
      const [handle, timer] = due[0];
      this.timers.delete(handle);
      this.now = timer.at;
      timer.fn();
    }
    this.now = until;
  }

  get pending() {
    return this.timers.size;
  }
}

function started() {
  const timers = new FakeTimers();
  const acks = [];
  const s = new SessionState({ sendAck: (seq) => acks.push(seq), setTimer: timers.set, clearTimer: timers.clear });
  s.start({ session: 'a1b2c3d4e5f60718', key: 'secret', expiry: 120 });
  return { s, timers, acks };
}

const request = (s, type, id) => s.number((seq) => encodeMessage(type, null, id, seq));

test('the contract: 32 messages or 200 ms', () => {
  assert.equal(ACK_EVERY, 32);
  assert.equal(ACK_DELAY, 200);
});

test('outbound messages are numbered from 1, consecutively, and kept until acked', () => {
  const { s } = started();
  const sent = [1, 2, 3].map((id) => request(s, 'echo', id));
  assert.deepEqual(sent.map((m) => m.seq), [1, 2, 3]);
  assert.deepEqual(decodeMessage(sent[1].text), { type: 'echo', id: 2, data: null, error: undefined, bare: false, seq: 2 });
  assert.deepEqual(s.buffer.map((e) => e.seq), [1, 2, 3]);
  assert.equal(s.nextSeq, 4);
});

test('a message that cannot be encoded does not use a seq (no gap for the server)', () => {
  const { s } = started();
  request(s, 'a', 1);
  assert.throws(() => s.number(() => {
    throw new RangeError('too large');
  }), RangeError);
  assert.equal(request(s, 'b', 2).seq, 2);
  assert.deepEqual(s.buffer.map((e) => e.seq), [1, 2]);
});

test('a message that could not be written gives its seq back and leaves no copy to resend', () => {
  const { s } = started();
  request(s, 'a', 1);
  const failed = request(s, 'b', 2);
  assert.equal(s.unnumber(1), false); // not the last: only a write that just failed is undone
  assert.equal(s.unnumber(failed.seq), true);
  assert.equal(s.unnumber(failed.seq), false);
  assert.deepEqual(s.buffer.map((e) => e.seq), [1]);
  assert.equal(request(s, 'c', 3).seq, 2);
  assert.deepEqual(s.resendAfter(0).map((text) => JSON.parse(text).type), ['a', 'c']);
});

test('server acks trim the resend buffer cumulatively; stale and bogus acks change nothing', () => {
  const { s } = started();
  for (let id = 1; id <= 5; id++) request(s, 'echo', id);
  assert.equal(s.serverAcked(2), true);
  assert.deepEqual(s.buffer.map((e) => e.seq), [3, 4, 5]);
  assert.equal(s.serverAcked(1), true); // below the previous one: ignored
  assert.deepEqual(s.buffer.map((e) => e.seq), [3, 4, 5]);
  assert.equal(s.serverAcked(6), false); // above what was sent: the server's error
  assert.equal(s.serverAcked(-1), false);
  assert.equal(s.serverAcked('3'), false);
  assert.equal(s.serverAcked(2 ** 60), false);
  assert.deepEqual(s.buffer.map((e) => e.seq), [3, 4, 5]);
  assert.equal(s.serverAck, 2);
  assert.equal(s.serverAcked(5), true);
  assert.deepEqual(s.buffer, []);
});

test('a resume resends, in order and unchanged, exactly what the server did not get', () => {
  const { s } = started();
  const texts = [1, 2, 3, 4].map((id) => request(s, 'echo', id).text);
  s.serverAcked(1);
  s.detach();
  assert.deepEqual(s.resendAfter(2), texts.slice(2));
  s.reattach();
  // Numbering continues after the resent ones.
  assert.equal(request(s, 'echo', 5).seq, 5);
  assert.deepEqual(s.resendAfter(0), [...texts.slice(2), s.buffer[2].text]); // ack below: all kept
});

test('inbound: new, duplicate (dropped) and gap', () => {
  const { s } = started();
  assert.equal(s.receive(1), 'new');
  assert.equal(s.receive(2), 'new');
  assert.equal(s.receive(2), 'duplicate');
  assert.equal(s.receive(1), 'duplicate');
  assert.equal(s.receive(4), 'gap');
  assert.equal(s.received, 2); // a gap delivers nothing
  assert.equal(s.receive(3), 'new');
});

test('a replay that overlaps what arrived: every seq delivered exactly once, in order', () => {
  const { s } = started();
  const delivered = [];
  const feed = (seqs) => {
    for (const seq of seqs) if (s.receive(seq) === 'new') delivered.push(seq);
  };
  feed([1, 2, 3, 4, 5]);
  s.detach();
  s.resuming();
  feed([3, 4, 5, 6, 7]); // the server replays from its last ack (2): 3..5 are duplicates
  s.reattach();
  feed([8, 9]);
  assert.deepEqual(delivered, [1, 2, 3, 4, 5, 6, 7, 8, 9]);
});

test('acks: one 200 ms after the first unacked message, not one per message', () => {
  const { s, timers, acks } = started();
  s.receive(1);
  timers.advance(150);
  s.receive(2);
  s.receive(3);
  assert.deepEqual(acks, []);
  assert.equal(timers.pending, 1);
  timers.advance(49);
  assert.deepEqual(acks, []);
  timers.advance(1);
  assert.deepEqual(acks, [3]); // 200 ms after message 1, covering 1..3
  assert.equal(timers.pending, 0);
  timers.advance(10_000);
  assert.deepEqual(acks, [3]); // nothing new, nothing sent
  s.receive(4);
  timers.advance(200);
  assert.deepEqual(acks, [3, 4]);
});

test('acks: at once on the 32nd unacked message, and the timer is cancelled', () => {
  const { s, timers, acks } = started();
  for (let seq = 1; seq <= 31; seq++) s.receive(seq);
  assert.deepEqual(acks, []);
  s.receive(32);
  assert.deepEqual(acks, [32]);
  assert.equal(timers.pending, 0);
  for (let seq = 33; seq <= 100; seq++) s.receive(seq);
  assert.deepEqual(acks, [32, 64, 96]);
  timers.advance(200);
  assert.deepEqual(acks, [32, 64, 96, 100]);
  // Duplicates never cause an ack.
  for (let seq = 1; seq <= 100; seq++) s.receive(seq);
  timers.advance(1000);
  assert.deepEqual(acks, [32, 64, 96, 100]);
});

test('a clean close flushes the ack at once; nothing unacked sends nothing', () => {
  const { s, timers, acks } = started();
  s.flushAck();
  assert.deepEqual(acks, []);
  s.receive(1);
  s.receive(2);
  s.flushAck();
  assert.deepEqual(acks, [2]);
  assert.equal(timers.pending, 0);
});

test('detached, no ack goes out; the resume carries it instead', () => {
  const { s, timers, acks } = started();
  s.receive(1);
  s.detach();
  assert.equal(timers.pending, 0);
  timers.advance(1000);
  s.flushAck();
  assert.deepEqual(acks, []);
  s.receive(2); // a message read before the close was noticed
  timers.advance(1000);
  assert.deepEqual(acks, []);
  assert.equal(s.resuming(), 2); // the resume's ack
  s.reattach();
  s.flushAck();
  assert.deepEqual(acks, []); // the resume acknowledged it already
  s.receive(3);
  timers.advance(200);
  assert.deepEqual(acks, [3]);
});

test('a new session starts both counters again; forget() clears the secret', () => {
  const { s, acks, timers } = started();
  request(s, 'echo', 1);
  s.receive(1);
  s.start({ session: 'ffffffffffffffff', key: 'other', expiry: 60 });
  assert.equal(timers.pending, 0);
  assert.equal(s.nextSeq, 1);
  assert.equal(s.received, 0);
  assert.deepEqual(s.buffer, []);
  assert.equal(s.receive(1), 'new');
  s.forget();
  assert.equal(s.started, false);
  assert.equal(s.key, null);
  assert.equal(timers.pending, 0);
  assert.deepEqual(acks, []);
});
