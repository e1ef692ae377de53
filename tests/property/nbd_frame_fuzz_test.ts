/**
 * Seeded fuzzing of NBD frames against an in-process NbdServer of a small MemoryDevice.
 *
 * Each run starts a server and opens 1 to 3 fuzzing connections to it at once. A
 * connection's stream is the client's flags (mostly fixed newstyle; or unknown bits),
 * a few options (STRUCTURED_REPLY, LIST, INFO, unsupported ones, malformed ones, now
 * and then one without the IHAVEOPT magic, an oversized one, ABORT, or more than the
 * 64 allowed), the choice of the export (GO or EXPORT_NAME, known or not, or none),
 * then up to 50 requests, each valid, well framed but bad (past the end, huge length,
 * unsupported command, flags not advertised, offset near 2^53 or 2^64, zero length), one
 * the server cannot trust (bad magic, a WRITE too large to drain), or DISC. A third of
 * the streams are then corrupted part-way: bytes flipped, cut mid-frame (the connection
 * ends there), garbage from there on, or bytes inserted. The stream goes out in random
 * pieces; the connection then ends its stream and reads to the end, or (one in ten)
 * drops the socket.
 *
 * An oracle written from the NBD protocol (fixed newstyle, simple and structured
 * replies) and the choices src/nbd/ documents (which options are served, their
 * limits, which errno answers what), not from the server's code, reads the same bytes
 * and says what the server must do. Invariants checked:
 * 1. No crash: no uncaught error (Deno fails the test on one), no error-level log line;
 *    the server still serves and shuts down.
 * 2. No hang: every connection is answered and closed within 5 s of ending its stream;
 *    the server closes every fuzzing connection, a dropped one too, once what it started
 *    has finished; shutdown completes.
 * 3. Replies: the greeting; then each option's replies in order (the right option,
 *    reply types and info types, the export's size and flags); then every whole request
 *    before a frame that cannot be trusted, or DISC, gets exactly one reply with its
 *    cookie and the expected error (a READ its data: simple, or one OFFSET_DATA or
 *    ERROR chunk once structured replies were negotiated), also when more bytes followed
 *    the frame that ended the connection; nothing else is sent. (Only after a close in
 *    the handshake, which leaves bytes unread, may a TCP reset cut the output short;
 *    then what arrived is checked.)
 * 4. No write outside the device: no call with a range outside [0, size) reaches the
 *    device, and the data-changing calls that do are exactly the valid writes, trims
 *    and write-zeroes sent, with their data; none sent after a frame that closed the
 *    connection runs.
 * 5. The device holds its initial bytes with those calls applied, read directly and
 *    through a bystander connection that was open all along.
 * 6. Other clients are served: the bystander answers a FLUSH and reads the whole
 *    device; then a new client negotiates, writes, and reads its data back.
 * 7. Log: input the server cannot go on from (bad flags, a bad option, an unknown
 *    export, a frame that cannot be trusted) gets exactly one line saying it closes;
 *    refused requests one line each, at most 5.
 *
 * Replay a failure with the seed and path fast-check prints:
 *   DST_SEED=<seed> DST_PATH=<path> deno test -A --unstable-net tests/property/nbd_frame_fuzz_test.ts
 */

import assert from "node:assert/strict";
import fc from "fast-check";
import type { HostPort } from "../../src/lib/address.ts";
import { NbdServer } from "../../src/nbd/server.ts";
import { closeQuietly, readExact, writeAll } from "../../src/transport/byte_conn.ts";
import { concat } from "../helpers/bytes.ts";
import {
  corrupt,
  type Delivery,
  delivery,
  type Expected,
  fuzzFrames,
  hugeOffset,
  type OutputReader,
  pastEnd,
  type Payload,
  payloadBytes,
  type PlainClient,
  rangeIn,
  type RecordingLogger,
  StreamBuilder,
  u16,
  u32,
  WAIT_MS,
  within,
} from "../helpers/frame_fuzz.ts";

/** Not a multiple of any block size, so a range check that rounds shows. */
const SIZE = 80 * 1024 + 37;
const NAME = "fuzzed";
const MiB = 1024 * 1024;

// The protocol's numbers, written out here rather than imported, so the oracle does
// not share a mistake with the code under test. NBD is big-endian.
const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
const OPT = { EXPORT_NAME: 1, ABORT: 2, LIST: 3, INFO: 6, GO: 7, STRUCTURED_REPLY: 8 };
const REP = { ACK: 1, SERVER: 2, INFO: 3, ERR_UNSUP: 2 ** 31 + 1, ERR_INVALID: 2 ** 31 + 3 };
const REP_ERR_UNKNOWN = 2 ** 31 + 6;
const INFO_EXPORT = 0, INFO_NAME = 1, INFO_DESCRIPTION = 2, INFO_BLOCK_SIZE = 3;
const READ = 0, WRITE = 1, DISC = 2, FLUSH = 3, TRIM = 4, WRITE_ZEROES = 6;
const FUA = 1, NO_HOLE = 2;
const EINVAL = 22, ENOSPC = 28;
/** HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN. */
const TRANSMISSION_FLAGS = 1 | 4 | 8 | 32 | 64 | 256;
/** The documented limits of src/nbd/: options per connection, bytes per option, block size. */
const OPTIONS_MAX = 64;
const OPTION_BYTES_MAX = 8192;
const BLOCK_MAX = 32 * MiB;
const REPLY_TYPE_OFFSET_DATA = 1;
const REPLY_TYPE_ERROR = 2 ** 15 + 1;

// ---------------------------------------------------------------------------------
// Generators

/** An option as raw as the wire has it; `length` may differ from the data's size. */
interface RawOption {
  magic: bigint;
  option: number;
  length: number;
  data: Payload;
}

/** A request as raw as the wire has it: u64s as bigints, any magic. */
interface RawRequest {
  magic: number;
  flags: number;
  type: number;
  offset: bigint;
  length: number;
  /** Sent after the header: a WRITE's data, or nothing. */
  payload: Payload;
}

function option(code: number, data: Payload = new Uint8Array()): RawOption {
  return { magic: IHAVEOPT, option: code, length: data.length, data };
}

function request(type: number, fields: Partial<RawRequest> = {}): RawRequest {
  return {
    magic: REQUEST_MAGIC,
    flags: 0,
    type,
    offset: 0n,
    length: 0,
    payload: new Uint8Array(),
    ...fields,
  };
}

const text = (s: string) => new TextEncoder().encode(s);

/** INFO and GO data: name length, name, count of info requests, the requests. */
function infoData(name: Uint8Array, infos: number[]): Uint8Array {
  const bytes = new Uint8Array(4 + name.length + 2 + 2 * infos.length);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, name.length);
  bytes.set(name, 4);
  view.setUint16(4 + name.length, infos.length);
  infos.forEach((info, i) => view.setUint16(6 + name.length + 2 * i, info));
  return bytes;
}

const exportName = fc.oneof(
  { weight: 4, arbitrary: fc.constantFrom("", NAME).map(text) },
  { weight: 1, arbitrary: fc.oneof(fc.constantFrom("other", "fuzzed2"), fc.string()).map(text) },
  { weight: 1, arbitrary: fc.uint8Array({ maxLength: 12 }) },
);
const infos = fc.array(
  fc.oneof(fc.constantFrom(INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE), u16),
  { maxLength: 5 },
);

const infoOption = (code: number) =>
  fc.oneof(
    {
      weight: 4,
      arbitrary: fc.tuple(exportName, infos).map(([n, i]) => option(code, infoData(n, i))),
    },
    // Malformed: short, a name length past the data, a count that does not match.
    { weight: 1, arbitrary: fc.uint8Array({ maxLength: 40 }).map((data) => option(code, data)) },
    {
      weight: 1,
      arbitrary: fc.tuple(exportName, infos, fc.integer({ min: -3, max: 3 })).map(
        ([n, i, skew]) => {
          const data = infoData(n, i);
          const view = new DataView(data.buffer);
          if (skew % 2 === 0) view.setUint32(0, Math.max(0, n.length + skew * 7));
          else view.setUint16(4 + n.length, Math.max(0, i.length + skew));
          return option(code, data);
        },
      ),
    },
  );

/** Options before the export is chosen: each gets replies, and negotiation goes on. */
const midOption: fc.Arbitrary<RawOption> = fc.oneof(
  { weight: 3, arbitrary: fc.constant(option(OPT.STRUCTURED_REPLY)) },
  { weight: 2, arbitrary: fc.constant(option(OPT.LIST)) },
  {
    weight: 1,
    arbitrary: fc.tuple(
      fc.constantFrom(OPT.STRUCTURED_REPLY, OPT.LIST),
      fc.uint8Array({
        minLength: 1,
        maxLength: 10,
      }),
    ).map(([code, data]) => option(code, data)),
  },
  { weight: 3, arbitrary: infoOption(OPT.INFO) },
  {
    weight: 2,
    arbitrary: fc.tuple(
      fc.oneof(fc.constantFrom(0, 4, 5, 9, 10, 11, 12), fc.integer({ min: 13, max: 0xffffffff })),
      fc.uint8Array({ maxLength: 30 }),
    ).map(([code, data]) => option(code, data)),
  },
);

/** Options that end negotiation on the server's side: it closes. */
const closingOption: fc.Arbitrary<RawOption> = fc.oneof(
  fc.tuple(fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }), midOption).filter(([magic]) =>
    magic !== IHAVEOPT
  ).map(([magic, o]) => ({ ...o, magic })),
  fc.tuple(
    fc.integer({ min: 1, max: 11 }),
    fc.integer({ min: OPTION_BYTES_MAX + 1, max: 0xffffffff }),
  )
    .map(([code, length]) => ({ magic: IHAVEOPT, option: code, length, data: new Uint8Array() })),
  fc.constant(option(OPT.ABORT)),
);

/** How the export is chosen (null: it is not, the stream goes on with requests anyway). */
const choice: fc.Arbitrary<RawOption | null> = fc.oneof(
  {
    weight: 16,
    arbitrary: fc.tuple(fc.constantFrom("", NAME), infos).map(([n, i]) =>
      option(OPT.GO, infoData(text(n), i))
    ),
  },
  // A GO that fails (unknown name, malformed): negotiation goes on, and the requests
  // that follow are read as options.
  { weight: 2, arbitrary: infoOption(OPT.GO) },
  { weight: 3, arbitrary: fc.constantFrom("", NAME).map((n) => option(OPT.EXPORT_NAME, text(n))) },
  {
    weight: 1,
    arbitrary: fc.constantFrom("x", "fuzzed ", "FUZZED").map((n) =>
      option(OPT.EXPORT_NAME, text(n))
    ),
  },
  { weight: 1, arbitrary: fc.constant(null) },
);

const negotiation = fc.record({
  flags: fc.oneof(
    { weight: 25, arbitrary: fc.constantFrom(1, 3) },
    { weight: 1, arbitrary: fc.constantFrom(0, 2) },
    { weight: 1, arbitrary: u32 },
  ),
  options: fc.oneof(
    { weight: 30, arbitrary: fc.array(midOption, { maxLength: 5 }) },
    {
      weight: 1,
      arbitrary: fc.tuple(fc.array(midOption, { maxLength: 3 }), closingOption).map((
        [before, last],
      ) => [...before, last]),
    },
    // More options than a client may send before choosing.
    { weight: 1, arbitrary: fc.constant(Array.from({ length: 65 }, () => option(OPT.LIST))) },
  ),
  choice,
});

const range = rangeIn(SIZE);

const rangedType = fc.constantFrom(READ, WRITE, TRIM, WRITE_ZEROES);
/**
 * The flags a command accepts: FUA on every one (the spec requires it once SEND_FUA is
 * advertised), and NO_HOLE on WRITE_ZEROES.
 */
const accepted = (type: number) =>
  type === WRITE_ZEROES ? FUA | NO_HOLE : [READ, WRITE, FLUSH, TRIM].includes(type) ? FUA : 0;

/** A ranged request with a payload exactly when it is a WRITE. */
function ranged(type: number, offset: bigint, length: number, seed: number, flags = 0) {
  const payload = type === WRITE ? { seed, length } : new Uint8Array();
  return request(type, { offset, length, payload, flags });
}

const valid: fc.Arbitrary<RawRequest> = fc.oneof(
  {
    weight: 3,
    arbitrary: range.map((r) => request(READ, { offset: BigInt(r.offset), length: r.length })),
  },
  {
    weight: 4,
    arbitrary: fc.tuple(range, fc.constantFrom(0, FUA), fc.integer()).map(([r, flags, seed]) =>
      ranged(WRITE, BigInt(r.offset), r.length, seed, flags)
    ),
  },
  {
    weight: 1,
    arbitrary: fc.tuple(fc.constantFrom(TRIM, WRITE_ZEROES), range, fc.nat({ max: 3 })).map((
      [type, r, flags],
    ) => ranged(type, BigInt(r.offset), r.length, 0, flags & accepted(type))),
  },
  // FLUSH has no range: whatever offset and length it carries are not looked at.
  {
    weight: 1,
    arbitrary: fc.tuple(fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }), u32).map(([offset, length]) =>
      request(FLUSH, { offset, length })
    ),
  },
);

const wellFramedBad: fc.Arbitrary<RawRequest> = fc.oneof(
  // Past the end (a WRITE carries all of its payload).
  fc.tuple(rangedType, pastEnd(SIZE), fc.integer()).map(([type, r, seed]) =>
    ranged(type, BigInt(r.offset), r.length, seed)
  ),
  // An offset at or past 2^53, or just below it so that offset + length overflows.
  fc.tuple(rangedType, hugeOffset, fc.integer({ min: 1, max: 4096 }), fc.integer()).map((
    [type, offset, length, seed],
  ) => ranged(type, offset, length, seed)),
  // Huge lengths: a READ over 32 MiB, a trim or write-zeroes up to 4 GiB.
  fc.tuple(fc.nat({ max: SIZE }), fc.integer({ min: BLOCK_MAX, max: 0xffffffff })).map((
    [offset, length],
  ) => request(READ, { offset: BigInt(offset), length })),
  fc.tuple(fc.constantFrom(TRIM, WRITE_ZEROES), fc.nat({ max: SIZE }), u32).map((
    [type, offset, length],
  ) => request(type, { offset: BigInt(offset), length: Math.max(length, SIZE + 1) })),
  // Zero length.
  fc.tuple(rangedType, fc.nat({ max: SIZE + 10 })).map(([type, offset]) =>
    request(type, { offset: BigInt(offset), length: 0 })
  ),
  // A command this server does not serve (CACHE, BLOCK_STATUS, unknown ones), with no payload.
  fc.record({
    type: fc.oneof(fc.constantFrom(5, 7), fc.integer({ min: 8, max: 0xffff })),
    flags: u16,
    offset: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
    length: u32,
  }).map((fields) => request(fields.type, fields)),
  // Flags not advertised (DF, REQ_ONE, FAST_ZERO, the rest) on an otherwise valid request.
  fc.tuple(valid, fc.integer({ min: 0, max: 15 }), u16).map(([r, bit, more]) => {
    const bad = (1 << bit) & ~accepted(r.type) || 1 << 4;
    return { ...r, flags: (r.flags | bad | (more & ~accepted(r.type))) & 0xffff };
  }),
);

const untrusted: fc.Arbitrary<RawRequest> = fc.oneof(
  fc.tuple(
    valid,
    fc.oneof(fc.constantFrom(SIMPLE_REPLY_MAGIC, 0x51545344, 0), u32).filter((m) =>
      m !== REQUEST_MAGIC
    ),
  ).map(([r, magic]) => ({ ...r, magic })),
  // A WRITE too large to drain: its payload is not sent.
  fc.tuple(fc.nat({ max: SIZE }), fc.integer({ min: BLOCK_MAX + 1, max: 0xffffffff })).map((
    [offset, length],
  ) => request(WRITE, { offset: BigInt(offset), length })),
);

const frame = fc.oneof(
  { weight: 30, arbitrary: valid },
  { weight: 25, arbitrary: wellFramedBad },
  { weight: 1, arbitrary: untrusted },
  { weight: 1, arbitrary: fc.constant(request(DISC)) },
);

interface Session extends Delivery {
  negotiation: { flags: number; options: RawOption[]; choice: RawOption | null };
  frames: RawRequest[];
  /** Cookies count up from here (they are opaque to the server; unique, replies are matched by them). */
  cookieBase: bigint;
}

const session: fc.Arbitrary<Session> = fc.record({
  negotiation,
  frames: fc.array(frame, { maxLength: 50, size: "max" }),
  cookieBase: fc.oneof(fc.constant(1n), fc.bigInt({ min: 0n, max: 2n ** 64n - 100n })),
  ...delivery,
});

// ---------------------------------------------------------------------------------
// Encoding

function encodeOption(o: RawOption): Uint8Array {
  const data = payloadBytes(o.data);
  const bytes = new Uint8Array(16 + data.length);
  const view = new DataView(bytes.buffer);
  view.setBigUint64(0, o.magic);
  view.setUint32(8, o.option);
  view.setUint32(12, o.length);
  bytes.set(data, 16);
  return bytes;
}

function encodeRequest(r: RawRequest, cookie: bigint): Uint8Array {
  const payload = payloadBytes(r.payload);
  const bytes = new Uint8Array(28 + payload.length);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, r.magic);
  view.setUint16(4, r.flags);
  view.setUint16(6, r.type);
  view.setBigUint64(8, cookie);
  view.setBigUint64(16, r.offset);
  view.setUint32(24, r.length);
  bytes.set(payload, 28);
  return bytes;
}

function encodeSession(s: Session): Uint8Array {
  const stream = new StreamBuilder();
  const flags = new Uint8Array(4);
  new DataView(flags.buffer).setUint32(0, s.negotiation.flags);
  stream.frame(flags);
  for (const o of s.negotiation.options) stream.frame(encodeOption(o));
  if (s.negotiation.choice !== null) stream.frame(encodeOption(s.negotiation.choice));
  s.frames.forEach((r, i) =>
    stream.frame(encodeRequest(r, BigInt.asUintN(64, s.cookieBase + BigInt(i))))
  );
  const bytes = stream.bytes();
  return s.corruption === null ? bytes : corrupt(bytes, stream.starts, s.corruption);
}

// ---------------------------------------------------------------------------------
// The oracle: what the server must do with a stream

interface ExpectedOptionReply {
  option: number;
  type: number;
  /** For an INFO reply: the info type it carries. */
  info?: number;
}

interface ExpectedReply {
  cookie: bigint;
  type: number;
  error: number;
  offset: bigint;
  length: number;
}

interface Expectation extends Expected {
  optionReplies: ExpectedOptionReply[];
  /** The export was chosen with EXPORT_NAME: its size and flags follow, padded unless NO_ZEROES. */
  exportNameReply: "none" | "short" | "padded";
  structured: boolean;
  replies: ExpectedReply[];
  refused: number;
  /** The server had to stop reading because of what it got, and says so in one log line. */
  closing: boolean;
}

function expect(stream: Uint8Array): Expectation {
  const e: Expectation = {
    optionReplies: [],
    exportNameReply: "none",
    structured: false,
    replies: [],
    calls: [],
    refused: 0,
    closing: false,
    cut: false,
  };
  const view = new DataView(stream.buffer, stream.byteOffset, stream.byteLength);
  const stopAt = (at: number, closing: boolean) => {
    e.cut = at < stream.length;
    e.closing = closing;
    return e;
  };
  if (stream.length < 4) return e;
  const flags = view.getUint32(0);
  if ((flags & ~3) !== 0 || (flags & 1) === 0) return stopAt(4, true);
  let at = 4;
  let transmission = false;
  for (let count = 0; count < OPTIONS_MAX && !transmission; count++) {
    if (stream.length - at < 16) return e;
    if (view.getBigUint64(at) !== IHAVEOPT) return stopAt(at + 16, true);
    const code = view.getUint32(at + 8);
    const length = view.getUint32(at + 12);
    if (length > OPTION_BYTES_MAX) return stopAt(at + 16, true);
    if (stream.length - at < 16 + length) return e;
    const data = stream.subarray(at + 16, at + 16 + length);
    at += 16 + length;
    const reply = (type: number, info?: number) =>
      e.optionReplies.push({ option: code, type, ...(info === undefined ? {} : { info }) });
    switch (code) {
      case OPT.EXPORT_NAME:
        if (!known(new TextDecoder().decode(data))) return stopAt(at, true);
        e.exportNameReply = (flags & 2) !== 0 ? "short" : "padded";
        transmission = true;
        break;
      case OPT.ABORT:
        reply(REP.ACK);
        return stopAt(at, false);
      case OPT.LIST:
        if (length !== 0) {
          reply(REP.ERR_INVALID);
        } else {
          reply(REP.SERVER);
          reply(REP.ACK);
        }
        break;
      case OPT.STRUCTURED_REPLY:
        if (length !== 0) {
          reply(REP.ERR_INVALID);
        } else {
          e.structured = true;
          reply(REP.ACK);
        }
        break;
      case OPT.INFO:
      case OPT.GO: {
        const parsed = parseInfo(data);
        if (parsed === null) {
          reply(REP.ERR_INVALID);
        } else if (!known(parsed.name)) {
          reply(REP_ERR_UNKNOWN);
        } else {
          reply(REP.INFO, INFO_EXPORT);
          if (parsed.infos.includes(INFO_BLOCK_SIZE)) reply(REP.INFO, INFO_BLOCK_SIZE);
          if (parsed.infos.includes(INFO_NAME)) reply(REP.INFO, INFO_NAME);
          if (parsed.infos.includes(INFO_DESCRIPTION)) reply(REP.INFO, INFO_DESCRIPTION);
          reply(REP.ACK);
          if (code === OPT.GO) transmission = true;
        }
        break;
      }
      default:
        reply(REP.ERR_UNSUP);
    }
  }
  if (!transmission) return stopAt(at, true); // more than OPTIONS_MAX options
  while (stream.length - at >= 28) {
    const magic = view.getUint32(at);
    const flags = view.getUint16(at + 4);
    const type = view.getUint16(at + 6);
    const cookie = view.getBigUint64(at + 8);
    const offset = view.getBigUint64(at + 16);
    const length = view.getUint32(at + 24);
    const payloadLength = type === WRITE ? length : 0;
    if (magic !== REQUEST_MAGIC || payloadLength > BLOCK_MAX) {
      e.closing = true;
      return e;
    }
    if (stream.length - at < 28 + payloadLength) return e; // the stream ends inside it
    const payload = stream.subarray(at + 28, at + 28 + payloadLength);
    at += 28 + payloadLength;
    if (type === DISC) return e; // what came before is answered, then it closes
    const error = refusal(type, flags, offset, length);
    e.replies.push({ cookie, type, error: error ?? 0, offset, length });
    if (error !== null) {
      e.refused += 1;
      continue;
    }
    const start = Number(offset);
    if (type === WRITE) {
      e.calls.push({ kind: "write", offset: start, length, data: payload.slice() });
    }
    if (type === TRIM) e.calls.push({ kind: "discard", offset: start, length, data: null });
    if (type === WRITE_ZEROES) e.calls.push({ kind: "zeroes", offset: start, length, data: null });
  }
  return e;
}

function known(name: string): boolean {
  return name === "" || name === NAME;
}

/** INFO and GO data, or null when it is malformed. */
function parseInfo(data: Uint8Array): { name: string; infos: number[] } | null {
  if (data.length < 6) return null;
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const nameLength = view.getUint32(0);
  if (nameLength > data.length - 6) return null;
  const count = view.getUint16(4 + nameLength);
  if (data.length !== 6 + nameLength + 2 * count) return null;
  const infos = Array.from({ length: count }, (_, i) => view.getUint16(6 + nameLength + 2 * i));
  return { name: new TextDecoder().decode(data.subarray(4, 4 + nameLength)), infos };
}

/** The error a request gets, or null when it is valid (src/nbd/transmission.ts's mapping). */
function refusal(type: number, flags: number, offset: bigint, length: number): number | null {
  if (![READ, WRITE, FLUSH, TRIM, WRITE_ZEROES].includes(type)) return EINVAL;
  if ((flags & ~accepted(type)) !== 0) return EINVAL;
  if (type === FLUSH) return null;
  if (length === 0) return EINVAL;
  if (type === READ && length > BLOCK_MAX) return EINVAL;
  // Past the end: ENOSPC for a write or write-zeroes, EINVAL for a read or trim (the spec).
  if (offset + BigInt(length) > BigInt(SIZE)) {
    return type === WRITE || type === WRITE_ZEROES ? ENOSPC : EINVAL;
  }
  return null;
}

/** Checks the server's whole output to one connection against the oracle. */
function checkReplies(out: OutputReader, e: Expectation): void {
  const greeting = out.take(18, "the greeting");
  assert.equal(greeting.getBigUint64(0), NBDMAGIC, "greeting: NBDMAGIC");
  assert.equal(greeting.getBigUint64(8), IHAVEOPT, "greeting: IHAVEOPT");
  assert.equal(greeting.getUint16(16), 3, "greeting: FIXED_NEWSTYLE | NO_ZEROES");
  e.optionReplies.forEach((expected, i) => {
    const what = `option reply ${i} (${JSON.stringify(expected)})`;
    const header = out.take(20, what);
    assert.equal(header.getBigUint64(0), OPTION_REPLY_MAGIC, `${what}: magic`);
    assert.equal(header.getUint32(8), expected.option, `${what}: option`);
    assert.equal(header.getUint32(12), expected.type, `${what}: type`);
    const payload = out.take(header.getUint32(16), `${what}'s payload`);
    if (expected.type === REP.INFO) {
      assert.equal(payload.getUint16(0), expected.info, `${what}: info type`);
      if (expected.info === INFO_EXPORT) {
        assert.equal(payload.byteLength, 12, `${what}: length`);
        assert.equal(payload.getBigUint64(2), BigInt(SIZE), `${what}: size`);
        assert.equal(payload.getUint16(10), TRANSMISSION_FLAGS, `${what}: flags`);
      }
      if (expected.info === INFO_BLOCK_SIZE) {
        assert.deepEqual(
          [payload.getUint32(2), payload.getUint32(6), payload.getUint32(10)],
          [1, 4096, BLOCK_MAX],
          `${what}: block sizes`,
        );
      }
    } else if (expected.type === REP.SERVER) {
      assert.equal(payload.getUint32(0), NAME.length, `${what}: name length`);
    } else if (expected.type === REP.ACK) {
      assert.equal(payload.byteLength, 0, `${what}: ACK payload`);
    }
  });
  if (e.exportNameReply !== "none") {
    const length = e.exportNameReply === "short" ? 10 : 134;
    const tail = out.take(length, "the EXPORT_NAME reply");
    assert.equal(tail.getBigUint64(0), BigInt(SIZE), "EXPORT_NAME reply: size");
    assert.equal(tail.getUint16(8), TRANSMISSION_FLAGS, "EXPORT_NAME reply: flags");
  }

  const pending = new Map<bigint, ExpectedReply[]>();
  for (const reply of e.replies) {
    const list = pending.get(reply.cookie) ?? [];
    list.push(reply);
    pending.set(reply.cookie, list);
  }
  const claim = (cookie: bigint, what: string, fits: (r: ExpectedReply) => boolean) => {
    const candidates = pending.get(cookie) ?? [];
    const index = candidates.findIndex(fits);
    assert.ok(index >= 0, `${what} answers no request; expected: ${show(candidates)}`);
    const expected = candidates.splice(index, 1)[0]!;
    if (candidates.length === 0) pending.delete(cookie);
    return expected;
  };
  while (out.remaining > 0) {
    const at = out.position;
    const magic = out.take(4, "a reply's magic").getUint32(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      const rest = out.take(12, "a simple reply");
      const error = rest.getUint32(0);
      const cookie = rest.getBigUint64(4);
      const what = `the simple reply at byte ${at} (cookie ${cookie}, error ${error})`;
      const expected = claim(cookie, what, (r) => r.error === error);
      assert.ok(
        !(e.structured && expected.type === READ),
        `${what}: a READ after STRUCTURED_REPLY`,
      );
      if (expected.type === READ && error === 0) out.take(expected.length, `${what}'s data`);
    } else {
      assert.equal(magic, STRUCTURED_REPLY_MAGIC, `the magic at byte ${at}`);
      assert.ok(e.structured, `a structured reply at byte ${at} without STRUCTURED_REPLY`);
      const rest = out.take(16, "a structured reply chunk");
      const flags = rest.getUint16(0);
      const type = rest.getUint16(2);
      const cookie = rest.getBigUint64(4);
      const length = rest.getUint32(12);
      const what = `the chunk at byte ${at} (cookie ${cookie}, type ${type})`;
      assert.equal(flags, 1, `${what}: flags (DONE)`);
      const payload = out.take(length, `${what}'s payload`);
      if (type === REPLY_TYPE_OFFSET_DATA) {
        const expected = claim(cookie, what, (r) => r.type === READ && r.error === 0);
        assert.equal(length, 8 + expected.length, `${what}: length`);
        assert.equal(payload.getBigUint64(0), expected.offset, `${what}: offset`);
      } else {
        assert.equal(type, REPLY_TYPE_ERROR, `${what}: type`);
        const error = payload.getUint32(0);
        claim(cookie, what, (r) => r.type === READ && r.error === error);
        assert.equal(length, 6 + payload.getUint16(4), `${what}: message length`);
      }
    }
  }
  const missing = [...pending.values()].flat();
  if (out.complete) {
    assert.equal(missing.length, 0, `requests the server never answered: ${show(missing)}`);
  }
}

function show(value: unknown): string {
  return JSON.stringify(value, (_, v) => typeof v === "bigint" ? `${v}n` : v);
}

/**
 * What the server logs about a connection: one line when it stops reading because of what it
 * got, and one per refused request, at most 5.
 */
function checkLog(log: RecordingLogger, peer: string, e: Expectation, where: string): void {
  const closing = log.warnings(peer, /closing/);
  assert.equal(closing.length, e.closing ? 1 : 0, `${where}: ${closing.join(" | ")}`);
  const refused = log.warnings(peer, /refused NBD request/);
  assert.equal(refused.length, Math.min(5, e.refused), `${where}: refusals logged`);
}

// ---------------------------------------------------------------------------------
// A well-behaved NBD client: negotiates with GO or EXPORT_NAME, then simple replies

class NbdClient implements PlainClient {
  #cookie = 0n;
  private constructor(readonly conn: Deno.TcpConn) {}

  static async connect(address: HostPort, useGo: boolean): Promise<NbdClient> {
    const conn = await Deno.connect(address);
    try {
      const greeting = new Uint8Array(18);
      await readExact(conn, greeting);
      assert.equal(new DataView(greeting.buffer).getBigUint64(0), NBDMAGIC, "greeting");
      const flags = new Uint8Array(4);
      new DataView(flags.buffer).setUint32(0, 3);
      await writeAll(conn, flags);
      if (useGo) {
        await writeAll(conn, encodeOption(option(OPT.GO, infoData(text(NAME), []))));
        for (;;) {
          const header = new Uint8Array(20);
          await readExact(conn, header);
          const view = new DataView(header.buffer);
          await readExact(conn, new Uint8Array(view.getUint32(16)));
          const type = view.getUint32(12);
          if (type === REP.ACK) break;
          assert.equal(type, REP.INFO, "GO reply type");
        }
      } else {
        await writeAll(conn, encodeOption(option(OPT.EXPORT_NAME, text(NAME))));
        const tail = new Uint8Array(10);
        await readExact(conn, tail);
        assert.equal(new DataView(tail.buffer).getBigUint64(0), BigInt(SIZE), "export size");
      }
      return new NbdClient(conn);
    } catch (error) {
      closeQuietly(conn);
      throw error;
    }
  }

  async ping(): Promise<void> {
    await this.#ask(FLUSH, 0, 0);
  }

  read(offset: number, length: number): Promise<Uint8Array> {
    return this.#ask(READ, offset, length);
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    await this.#ask(WRITE, offset, data.length, data);
  }

  /** One request and its simple reply (with a READ's data), bounded. */
  #ask(type: number, offset: number, length: number, payload?: Uint8Array): Promise<Uint8Array> {
    const cookie = ++this.#cookie;
    const what = `the reply to a well-behaved client's NBD command ${type}`;
    return within(
      WAIT_MS,
      what,
      (async () => {
        const header = encodeRequest(request(type, { offset: BigInt(offset), length }), cookie);
        await writeAll(this.conn, payload === undefined ? header : concat(header, payload));
        const reply = new Uint8Array(16);
        await readExact(this.conn, reply);
        const view = new DataView(reply.buffer);
        assert.equal(view.getUint32(0), SIMPLE_REPLY_MAGIC, `${what}: magic`);
        assert.equal(view.getUint32(4), 0, `${what}: error`);
        assert.equal(view.getBigUint64(8), cookie, `${what}: cookie`);
        const data = new Uint8Array(type === READ ? length : 0);
        await readExact(this.conn, data);
        return data;
      })(),
      () => this.close(),
    );
  }

  close(): void {
    closeQuietly(this.conn);
  }
}

// ---------------------------------------------------------------------------------

Deno.test("NBD frame fuzzing: no crash, no hang, no write outside the device, other clients served", async () => {
  await fuzzFrames({
    server: "server",
    handshake: "negotiation",
    size: SIZE,
    session,
    // NbdServer takes a Deno.Listener; it uses only accept, close and addr of it.
    serve: (device, listener, log) =>
      NbdServer.serve(device, listener as unknown as Deno.Listener, {
        name: NAME,
        description: "a device under fuzzing",
        log,
      }),
    // The bystander chooses the export with GO, the newcomer with EXPORT_NAME.
    connect: (address, who) => NbdClient.connect(address, who === "bystander"),
    encode: encodeSession,
    expect,
    checkReplies,
    checkLog,
  });
});
