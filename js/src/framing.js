// The two stream framings of docs/protocol.md as pure decoders: bytes in, frame bodies out.
//
// Like heartbeatd/wire/ (and Twisted's IntNStringReceiver) they know nothing of sockets, so
// they are tested byte by byte.  The length limit is checked as soon as the header is
// complete, before one byte of the body is held; a body split over reads is gathered into one
// buffer of exactly its length (one copy), and a read holding whole frames costs no copy at
// all (its bodies are views of the read).  What is held is bounded by the header plus
// `maxFrameBytes`.

/** The item a seed decoder yields for the bare `HeartBeat` token. */
export const HEARTBEAT = Object.freeze({ heartbeat: true });

/** The byte stream cannot be framed any more; the connection must close. */
export class FramingError extends Error {
  constructor(message, code = 'bad_frame') {
    super(message);
    this.name = 'FramingError';
    this.code = code;
  }
}

/** A header announced a body longer than the receiver accepts. */
export class FrameTooLarge extends FramingError {
  constructor(length, limit) {
    super(`frame of ${length} bytes exceeds the limit of ${limit} bytes`, 'frame_too_large');
    this.name = 'FrameTooLarge';
    this.length = length;
    this.limit = limit;
  }
}

// What a framing's _parse() says about the bytes at a frame boundary (else: a body length).
const INCOMPLETE = -1;
const TOKEN = -2;
const BROKEN = -3;

/**
 * The state machine both framings share: at a frame boundary a header (or token) that the
 * framing's `_parse` recognises, then a body of the announced length.  `feed(chunk)` returns
 * the items completed by the chunk (Uint8Array bodies, or HEARTBEAT), in order.  Once the
 * stream is broken, the items completed before the fault are still returned, `error` is set,
 * and every later feed returns nothing.
 */
class StreamDecoder {
  constructor(maxFrameBytes, headerLength) {
    if (!Number.isSafeInteger(maxFrameBytes) || maxFrameBytes < 0) {
      throw new RangeError(`maxFrameBytes must be a non-negative integer, not ${maxFrameBytes}`);
    }
    this.maxFrameBytes = maxFrameBytes;
    /** @type {FramingError | null} */
    this.error = null;
    this._header = new Uint8Array(headerLength); // a header split over reads
    this._headerHave = 0;
    this._body = null; // a body split over reads, allocated at its announced length
    this._bodyHave = 0;
    this._took = 0; // bytes of header or token the last _parse() recognised
  }

  /** Bytes held for an unfinished header, token or body. */
  get buffered() {
    return this._headerHave + this._bodyHave;
  }

  feed(chunk) {
    if (this.error !== null) return [];
    const data = chunk instanceof Uint8Array ? chunk : new Uint8Array(chunk);
    const end = data.length;
    const items = [];
    let offset = 0;
    while (offset < end) {
      if (this._body !== null) {
        const take = Math.min(this._body.length - this._bodyHave, end - offset);
        this._body.set(data.subarray(offset, offset + take), this._bodyHave);
        this._bodyHave += take;
        offset += take;
        if (this._bodyHave === this._body.length) {
          items.push(this._body);
          this._body = null;
          this._bodyHave = 0;
        }
        continue;
      }
      let found;
      if (this._headerHave === 0) {
        // The common case: the header lies whole in this read, parsed in place.
        found = this._parse(data, offset, end - offset);
        if (found === BROKEN) break;
        if (found !== INCOMPLETE) offset += this._took;
      }
      if (this._headerHave > 0 || found === INCOMPLETE) {
        // A header split over reads: keep it byte by byte (at most one header's worth),
        // checking each byte as it comes, so garbage is reported on its first byte.
        this._header[this._headerHave++] = data[offset++];
        found = this._parse(this._header, 0, this._headerHave);
        if (found === BROKEN) break;
        if (found === INCOMPLETE) continue;
        this._headerHave = 0;
      }
      if (found === TOKEN) {
        items.push(HEARTBEAT);
      } else if (end - offset >= found) {
        items.push(data.subarray(offset, offset + found));
        offset += found;
      } else {
        this._body = new Uint8Array(found);
        this._body.set(data.subarray(offset, end), 0);
        this._bodyHave = end - offset;
        offset = end;
      }
    }
    if (this.error !== null) {
      this._body = null;
      this._bodyHave = 0;
      this._headerHave = 0;
    }
    return items;
  }

  _length(length) {
    if (length > this.maxFrameBytes) {
      this.error = new FrameTooLarge(length, this.maxFrameBytes);
      return BROKEN;
    }
    return length;
  }
}

/** `int32`: a 4-byte big-endian unsigned length, then the body. */
export class Int32Decoder extends StreamDecoder {
  constructor(maxFrameBytes) {
    super(maxFrameBytes, 4);
  }

  _parse(bytes, at, available) {
    if (available < 4) return INCOMPLETE;
    this._took = 4;
    const length =
      bytes[at] * 0x1000000 + ((bytes[at + 1] << 16) | (bytes[at + 2] << 8) | bytes[at + 3]);
    return this._length(length);
  }
}

const SEED_PREFIX = 'length:';
const SEED_HEADER = 20; // "length:" + 13 digits
const SEED_TOKEN = 'HeartBeat';
const ASCII = (text) => Uint8Array.from(text, (c) => c.charCodeAt(0));
const PREFIX_BYTES = ASCII(SEED_PREFIX);
const TOKEN_BYTES = ASCII(SEED_TOKEN);

/** `seed`: "length:" + 13 zero-padded ASCII digits, then the body; or the bare token. */
export class SeedDecoder extends StreamDecoder {
  constructor(maxFrameBytes) {
    super(maxFrameBytes, SEED_HEADER);
  }

  _parse(bytes, at, available) {
    const first = bytes[at];
    if (first === TOKEN_BYTES[0]) {
      const n = Math.min(available, TOKEN_BYTES.length);
      for (let i = 0; i < n; i++) {
        if (bytes[at + i] !== TOKEN_BYTES[i]) return this._fail(bytes, at, i + 1);
      }
      if (available < TOKEN_BYTES.length) return INCOMPLETE;
      this._took = TOKEN_BYTES.length;
      return TOKEN;
    }
    if (first !== PREFIX_BYTES[0]) return this._fail(bytes, at, 1);
    const n = Math.min(available, SEED_HEADER);
    let length = 0;
    for (let i = 0; i < n; i++) {
      const b = bytes[at + i];
      if (i < PREFIX_BYTES.length) {
        if (b !== PREFIX_BYTES[i]) return this._fail(bytes, at, i + 1);
      } else if (b < 0x30 || b > 0x39) {
        return this._fail(bytes, at, i + 1);
      } else {
        length = length * 10 + (b - 0x30); // 13 digits stay below 2**53
      }
    }
    if (available < SEED_HEADER) return INCOMPLETE;
    this._took = SEED_HEADER;
    return this._length(length);
  }

  _fail(bytes, at, upto) {
    const seen = String.fromCharCode(...bytes.subarray(at, at + upto));
    this.error = new FramingError(
      `expected a 'length:' header or the 'HeartBeat' token at a frame boundary, got ${JSON.stringify(seen)}`,
    );
    return BROKEN;
  }
}

const encoder = new TextEncoder();

function withHeader(header, body) {
  const bytes = typeof body === 'string' ? encoder.encode(body) : body;
  const out = new Uint8Array(header.length + bytes.length);
  out.set(header, 0);
  out.set(bytes, header.length);
  return out;
}

/** One int32 frame: the 4-byte length, then the body (a string is encoded as UTF-8). */
export function encodeInt32(body) {
  const bytes = typeof body === 'string' ? encoder.encode(body) : body;
  if (bytes.length > 0xffffffff) throw new RangeError('a frame body is at most 2**32 - 1 bytes');
  const n = bytes.length;
  return withHeader(Uint8Array.of(n >>> 24, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff), bytes);
}

/** One seed frame: "length:" + 13 digits, then the body (a string is encoded as UTF-8). */
export function encodeSeed(body) {
  const bytes = typeof body === 'string' ? encoder.encode(body) : body;
  if (bytes.length > 9999999999999) throw new RangeError('a seed frame body is at most 13 digits long');
  return withHeader(ASCII(SEED_PREFIX + String(bytes.length).padStart(13, '0')), bytes);
}

/**
 * The framings by name: `encode(body)`, `decoder(maxFrameBytes)`, and `heartbeatToken`, the
 * bytes of an out-of-band heartbeat (null when heartbeats are ping envelopes).
 */
export const framings = Object.freeze({
  int32: Object.freeze({
    name: 'int32',
    encode: encodeInt32,
    decoder: (maxFrameBytes) => new Int32Decoder(maxFrameBytes),
    heartbeatToken: null,
    bareValues: false,
  }),
  seed: Object.freeze({
    name: 'seed',
    encode: encodeSeed,
    decoder: (maxFrameBytes) => new SeedDecoder(maxFrameBytes),
    heartbeatToken: TOKEN_BYTES,
    bareValues: true,
  }),
});
