// The framings, byte by byte: every split point of a stream, limits checked before buffering,
// garbage reported on its first byte.  Pure: no socket, no timer.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  encodeInt32,
  encodeSeed,
  FrameTooLarge,
  FramingError,
  framings,
  HEARTBEAT,
  Int32Decoder,
  SeedDecoder,
} from '../src/framing.js';

const text = (item) => (item === HEARTBEAT ? 'HB' : new TextDecoder().decode(item));
const concat = (...parts) => {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
};
const ascii = (s) => new TextEncoder().encode(s);

/** Feed `stream` cut at `cuts` (sorted positions); return every item and the decoder. */
function feedCut(decoder, stream, cuts) {
  const items = [];
  let start = 0;
  for (const cut of [...cuts, stream.length]) {
    items.push(...decoder.feed(stream.subarray(start, cut)).map(text));
    start = cut;
  }
  return items;
}

const BODIES = ['{"type":"hello"}', '', '{"type":"echo","id":1,"data":"héllo ✓ 𝄞"}', 'x'.repeat(300)];

test('int32 encodes the 4-byte big-endian length of the UTF-8 body', () => {
  assert.deepEqual([...encodeInt32('ab')], [0, 0, 0, 2, 97, 98]);
  assert.deepEqual([...encodeInt32('é').subarray(0, 4)], [0, 0, 0, 2]);
  const big = encodeInt32(new Uint8Array(0x01020304 & 0xffff));
  assert.deepEqual([...big.subarray(0, 4)], [0, 0, 0x03, 0x04]);
});

test('seed encodes "length:" and 13 zero-padded digits', () => {
  assert.equal(text(encodeSeed('"Thu, 01 Jan 2026 00:00:00 GMT"')), 'length:0000000000031"Thu, 01 Jan 2026 00:00:00 GMT"');
});

test('int32: a stream of frames split at every single position', () => {
  const stream = concat(...BODIES.map((b) => encodeInt32(b)));
  for (let cut = 0; cut <= stream.length; cut++) {
    const decoder = new Int32Decoder(1024);
    assert.deepEqual(feedCut(decoder, stream, [cut]), BODIES, `split at ${cut}`);
    assert.equal(decoder.buffered, 0);
    assert.equal(decoder.error, null);
  }
});

test('int32: every pair of split positions, and one byte at a time', () => {
  const stream = concat(...BODIES.slice(0, 3).map((b) => encodeInt32(b)));
  for (let a = 0; a <= stream.length; a++) {
    for (let b = a; b <= stream.length; b++) {
      assert.deepEqual(feedCut(new Int32Decoder(1024), stream, [a, b]), BODIES.slice(0, 3), `cuts ${a},${b}`);
    }
  }
  const cuts = Array.from({ length: stream.length }, (_, i) => i);
  assert.deepEqual(feedCut(new Int32Decoder(1024), stream, cuts), BODIES.slice(0, 3));
});

test('int32: what is held while a frame arrives is counted, and never more than one frame', () => {
  const decoder = new Int32Decoder(1024);
  const frame = encodeInt32('y'.repeat(100));
  assert.deepEqual(decoder.feed(frame.subarray(0, 2)), []);
  assert.equal(decoder.buffered, 2);
  assert.deepEqual(decoder.feed(frame.subarray(2, 50)), []);
  assert.equal(decoder.buffered, 46); // the body so far: the parsed header is not kept
  assert.equal(decoder.feed(frame.subarray(50)).length, 1);
  assert.equal(decoder.buffered, 0);
});

test('int32: a whole frame in one read is a view of the read, not a copy', () => {
  const frame = encodeInt32('{"type":"pong"}');
  const [body] = new Int32Decoder(1024).feed(frame);
  assert.equal(body.buffer, frame.buffer);
});

test('int32: the limit is checked from the header, before any body byte is held', () => {
  for (const split of [1, 2, 3, 4]) {
    const decoder = new Int32Decoder(10);
    const frame = encodeInt32('z'.repeat(11));
    const items = feedCut(decoder, concat(encodeInt32('ok'), frame), [6 + split]);
    assert.deepEqual(items, ['ok']); // what came before the fault is still delivered
    assert.ok(decoder.error instanceof FrameTooLarge);
    assert.equal(decoder.error.code, 'frame_too_large');
    assert.equal(decoder.error.length, 11);
    assert.equal(decoder.buffered, 0);
    assert.deepEqual(decoder.feed(encodeInt32('later')), []); // broken for good
  }
  // 2**32 - 1 announced: refused at once, nothing allocated.
  const decoder = new Int32Decoder(1024 * 1024);
  decoder.feed(Uint8Array.of(0xff, 0xff, 0xff, 0xff, 1, 2, 3));
  assert.equal(decoder.error.length, 0xffffffff);
  // Exactly at the limit is accepted.
  assert.deepEqual(new Int32Decoder(3).feed(encodeInt32('abc')).map(text), ['abc']);
});

const SEED_STREAM = concat(
  encodeSeed('"Thu, 01 Jan 2026 00:00:00 GMT"'),
  ascii('HeartBeat'),
  encodeSeed('{"type":"hello","data":{"framing":"seed"}}'),
  ascii('HeartBeatHeartBeat'),
  encodeSeed(''),
  encodeSeed('[1,"✓"]'),
);
const SEED_ITEMS = [
  '"Thu, 01 Jan 2026 00:00:00 GMT"',
  'HB',
  '{"type":"hello","data":{"framing":"seed"}}',
  'HB',
  'HB',
  '',
  '[1,"✓"]',
];

test('seed: frames and tokens split at every single position', () => {
  for (let cut = 0; cut <= SEED_STREAM.length; cut++) {
    const decoder = new SeedDecoder(1024);
    assert.deepEqual(feedCut(decoder, SEED_STREAM, [cut]), SEED_ITEMS, `split at ${cut}`);
    assert.equal(decoder.buffered, 0);
  }
});

test('seed: every pair of split positions, and one byte at a time', () => {
  const stream = SEED_STREAM.subarray(0, 80);
  const whole = feedCut(new SeedDecoder(1024), stream, []);
  for (let a = 0; a <= stream.length; a++) {
    for (let b = a; b <= stream.length; b++) {
      assert.deepEqual(feedCut(new SeedDecoder(1024), stream, [a, b]), whole, `cuts ${a},${b}`);
    }
  }
  const cuts = Array.from({ length: SEED_STREAM.length }, (_, i) => i);
  assert.deepEqual(feedCut(new SeedDecoder(1024), SEED_STREAM, cuts), SEED_ITEMS);
});

test('seed: garbage at a frame boundary is reported on its first impossible byte', () => {
  for (const [garbage, seen] of [
    ['GET / HTTP/1.1\r\n', '"G"'],
    ['lengthX', '"lengthX"'],
    ['length:00000000a0001', '"length:00000000a"'],
    ['HeartBead', '"HeartBead"'],
    ['Heartbeat', '"Heartb"'],
  ]) {
    const stream = concat(encodeSeed('1'), ascii(garbage), encodeSeed('2'));
    for (let cut = 0; cut <= stream.length; cut++) {
      const decoder = new SeedDecoder(1024);
      const items = feedCut(decoder, stream, [cut]);
      assert.deepEqual(items, ['1'], `${garbage} split at ${cut}`);
      assert.ok(decoder.error instanceof FramingError);
      assert.equal(decoder.error.code, 'bad_frame');
      assert.ok(decoder.error.message.endsWith(`got ${seen}`), decoder.error.message);
      assert.equal(decoder.buffered, 0);
    }
  }
});

test('seed: the limit is checked from the header, before any body byte is held', () => {
  const decoder = new SeedDecoder(10);
  const items = feedCut(decoder, concat(encodeSeed('ok'), ascii('length:0000000000011')), [25]);
  assert.deepEqual(items, ['ok']);
  assert.equal(decoder.error.code, 'frame_too_large');
  assert.equal(decoder.error.length, 11);
  const huge = new SeedDecoder(1024 * 1024);
  huge.feed(ascii('length:9999999999999'));
  assert.equal(huge.error.length, 9999999999999);
});

test('framings by name', () => {
  assert.deepEqual(Object.keys(framings), ['int32', 'seed']);
  assert.equal(framings.int32.heartbeatToken, null);
  assert.equal(text(framings.seed.heartbeatToken), 'HeartBeat');
  assert.ok(framings.seed.decoder(5) instanceof SeedDecoder);
  assert.throws(() => new Int32Decoder(-1), RangeError);
});
