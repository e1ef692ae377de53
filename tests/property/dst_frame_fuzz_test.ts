/**
 * Seeded fuzzing of DST frames against an in-process Exporter of a small MemoryDevice.
 *
 * Each run starts an export and opens 1 to 3 fuzzing connections to it at once. A
 * connection's stream is a client hello (mostly valid; or refused; or one the export
 * must not answer) and up to 50 requests, each valid, well framed but bad (past the
 * end, huge length, unknown command, bad flags, offset near 2^53 or 2^64, zero length,
 * wrong payload length, nonzero range on a command without one) or a frame the export
 * cannot trust (bad magic, payload length over 32 MiB, txId from 2^53). A third of the
 * streams are then corrupted part-way: bytes flipped, cut mid-frame (the connection
 * ends there), garbage from there on, or bytes inserted. The stream goes out in random
 * pieces; the connection then ends its stream and reads to the end, or (one in ten)
 * drops the socket.
 *
 * An oracle written from src/protocol/README.md, not from the export's code, reads
 * the same bytes and says what the export must do. Invariants checked:
 * 1. No crash: no uncaught error (Deno fails the test on one), no error-level log line;
 *    the export still serves and shuts down.
 * 2. No hang: every connection is answered and closed within 5 s of ending its stream;
 *    the export closes every fuzzing connection, a dropped one too, once what it started
 *    has finished; shutdown completes.
 * 3. Replies: a hello is answered with the status the spec's order gives (or not at
 *    all, for a bad magic, versionMin > versionMax, or a stream that ends before its
 *    hello, even an empty one: it ends long before the export would greet silence as an
 *    NBD client, which src/server/handshake_test.ts checks); every whole request before a
 *    frame that cannot be trusted gets exactly one reply, with its txId and command and
 *    the spec's error code and payload length, also when more bytes followed that frame;
 *    nothing else is sent. (Only after a close in the handshake, which leaves bytes
 *    unread, may a TCP reset cut the output short; then what arrived is checked.)
 * 4. No write outside the device: no call with a range outside [0, size) reaches the
 *    device, and the data-changing calls that do are exactly the valid writes, discards
 *    and write-zeroes sent, with their data; none sent after a frame that closed the
 *    connection, or after a refused hello, runs.
 * 5. The device holds its initial bytes with those calls applied, read directly and
 *    through a bystander connection that was open all along.
 * 6. Other clients are served: the bystander answers a PING and reads the whole device;
 *    then a new client handshakes, writes, and reads its data back.
 * 7. Log: a frame that cannot be trusted gets exactly one line saying the connection
 *    closes, a refused or unanswered hello one line, and refused requests one line
 *    each, at most 5.
 * 8. STATUS counts every refused request, broken frame and refused hello in `errors`.
 *
 * Replay a failure with the seed and path fast-check prints:
 *   DST_SEED=<seed> DST_PATH=<path> deno test -A --unstable-net tests/property/dst_frame_fuzz_test.ts
 */

import assert from "node:assert/strict";
import fc from "fast-check";
import type { HostPort } from "../../src/lib/address.ts";
import { Exporter } from "../../src/server/exporter.ts";
import { MemoryGeneration } from "../../src/server/write_generation.ts";
import { WriterLease } from "../../src/server/writer_lease.ts";
import { Command, WireError } from "../../src/protocol/mod.ts";
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
import { RawClient } from "../helpers/raw_client.ts";

/** Not a multiple of any block size, so a range check that rounds shows. */
const SIZE = 80 * 1024 + 37;
const MiB = 1024 * 1024;
const TWO_32 = 2 ** 32;

// The spec's numbers, written out here rather than imported, so the oracle does not
// share a mistake with the code under test.
const MAGIC = { DSTC: 0x43545344, DSTS: 0x53545344, DSTQ: 0x51545344, DSTR: 0x52545344 };
const READ = 1, WRITE = 2, FLUSH = 3, DISCARD = 4, WRITE_ZEROES = 5;
const INFO = 6, PING = 7, STATUS = 8, CONTROL = 9;
const RANGED = [READ, WRITE, DISCARD, WRITE_ZEROES];
const EINVAL = 22, ENOSPC = 28, ENOTSUP = 95;
const STATUS_OK = 0, VERSION_UNSUPPORTED = 1, AUTH_UNSUPPORTED = 2, PROTECTION_UNSUPPORTED = 3;
const PAYLOAD_MAX = 32 * MiB;
const RANGE_MAX = 1024 * MiB;
const CONTROL_MAX = 4096;

// ---------------------------------------------------------------------------------
// Generators

interface RawHello {
  magic: number;
  versionMin: number;
  versionMax: number;
  features: number;
  authMethods: number;
  protections: number;
  nonce: Uint8Array;
  /** Null: anonymous (all zero); else these bytes with the last one the session's number. */
  clientId: Uint8Array | null;
}

/** A request's fields as raw as the wire has them: u64s as bigints, any magic. */
interface RawRequest {
  magic: number;
  command: number;
  flags: number;
  /** Null: the session numbers it, counting up from its txBase, so ids are unique. */
  txId: bigint | null;
  offset: bigint;
  length: number;
  payloadLength: number;
  payload: Payload;
}

function request(command: number, fields: Partial<RawRequest> = {}): RawRequest {
  const payload = fields.payload ?? new Uint8Array();
  return {
    magic: MAGIC.DSTQ,
    command,
    flags: 0,
    txId: null,
    offset: 0n,
    length: 0,
    payloadLength: payload.length,
    ...fields,
    payload,
  };
}

const bytes16 = fc.uint8Array({ minLength: 16, maxLength: 16 });

const validHello: fc.Arbitrary<RawHello> = fc.record({
  magic: fc.constant(MAGIC.DSTC),
  versionMin: fc.constantFrom(0, 1),
  versionMax: fc.constantFrom(1, 2, 0xffff),
  features: fc.oneof(fc.constantFrom(0, 1), u32),
  authMethods: u16.map((mask) => mask | 1),
  protections: u16.map((mask) => mask | 1),
  nonce: bytes16,
  clientId: fc.option(bytes16, { nil: null }),
});

const hello: fc.Arbitrary<RawHello> = fc.oneof(
  { weight: 60, arbitrary: validHello },
  // Refused with a status: no version in common, no auth, no protection.
  {
    weight: 1,
    arbitrary: fc.tuple(validHello, fc.integer({ min: 2, max: 0xffff })).map(([h, min]) => ({
      ...h,
      versionMin: min,
      versionMax: Math.max(min, h.versionMax),
    })),
  },
  { weight: 1, arbitrary: validHello.map((h) => ({ ...h, versionMin: 0, versionMax: 0 })) },
  { weight: 1, arbitrary: validHello.map((h) => ({ ...h, authMethods: h.authMethods & ~1 })) },
  { weight: 1, arbitrary: validHello.map((h) => ({ ...h, protections: h.protections & ~1 })) },
  // Not answered: a wrong magic, or versionMin > versionMax.
  {
    weight: 1,
    arbitrary: fc.tuple(validHello, u32.filter((m) => m !== MAGIC.DSTC)).map(([h, magic]) => ({
      ...h,
      magic,
    })),
  },
  {
    weight: 1,
    arbitrary: fc.tuple(validHello, fc.integer({ min: 1, max: 0xffff })).map(([h, gap]) => ({
      ...h,
      versionMin: Math.min(0xffff, h.versionMax + gap),
      versionMax: Math.min(h.versionMax, 0xfffe),
    })),
  },
);

const range = rangeIn(SIZE);

const ioFlags = fc.constantFrom(0, 1, 2, 3);
const rangedCommand = fc.constantFrom(...RANGED);
const nonRangedCommand = fc.constantFrom(FLUSH, INFO, PING, STATUS);

/** A ranged request with a payload exactly when it is a WRITE. */
function ranged(command: number, offset: bigint, length: number, seed: number, flags = 0) {
  const payload = command === WRITE ? { seed, length } : new Uint8Array();
  return request(command, { offset, length, payload, flags });
}

const valid: fc.Arbitrary<RawRequest> = fc.oneof(
  {
    weight: 3,
    arbitrary: range.map((r) => request(READ, { offset: BigInt(r.offset), length: r.length })),
  },
  {
    weight: 4,
    arbitrary: fc.tuple(range, ioFlags, fc.integer()).map(([r, flags, seed]) =>
      ranged(WRITE, BigInt(r.offset), r.length, seed, flags)
    ),
  },
  {
    weight: 1,
    arbitrary: fc.tuple(fc.constantFrom(DISCARD, WRITE_ZEROES), range, ioFlags).map((
      [command, r, flags],
    ) => ranged(command, BigInt(r.offset), r.length, 0, flags)),
  },
  { weight: 2, arbitrary: nonRangedCommand.map((command) => request(command)) },
);

const wellFramedBad: fc.Arbitrary<RawRequest> = fc.oneof(
  // Past the end (a WRITE carries all of its payload).
  fc.tuple(rangedCommand, pastEnd(SIZE), fc.integer()).map(([command, r, seed]) =>
    ranged(command, BigInt(r.offset), r.length, seed)
  ),
  // An offset at or past 2^53, or just below it so that offset + length overflows.
  fc.tuple(rangedCommand, hugeOffset, fc.integer({ min: 1, max: 4096 }), fc.integer()).map((
    [command, offset, length, seed],
  ) => ranged(command, offset, length, seed)),
  // Huge lengths: a READ over 32 MiB, a DISCARD over 1 GiB, a WRITE that does not carry them.
  fc.tuple(fc.nat({ max: SIZE }), fc.integer({ min: PAYLOAD_MAX, max: 0xffffffff })).map((
    [offset, length],
  ) => request(READ, { offset: BigInt(offset), length })),
  fc.tuple(
    fc.constantFrom(DISCARD, WRITE_ZEROES),
    fc.nat({ max: SIZE }),
    fc.oneof(
      fc.integer({ min: SIZE, max: RANGE_MAX + 1 }),
      fc.integer({ min: RANGE_MAX, max: 0xffffffff }),
    ),
  ).map(([command, offset, length]) => request(command, { offset: BigInt(offset), length })),
  fc.tuple(fc.nat({ max: SIZE }), fc.integer({ min: PAYLOAD_MAX - 1, max: 0xffffffff })).map((
    [offset, length],
  ) => request(WRITE, { offset: BigInt(offset), length })),
  // Zero length.
  fc.tuple(rangedCommand, fc.nat({ max: SIZE + 10 })).map(([command, offset]) =>
    request(command, { offset: BigInt(offset), length: 0 })
  ),
  // An unknown command, with whatever else.
  fc.record({
    command: fc.oneof(fc.constant(0), fc.integer({ min: 10, max: 0xffff })),
    flags: u16,
    offset: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
    length: u32,
    payload: fc.uint8Array({ maxLength: 64 }),
  }).map((fields) => request(fields.command, fields)),
  // Flags the command does not accept, on an otherwise valid request.
  fc.tuple(valid, fc.integer({ min: 0, max: 15 }), u16).map(([r, bit, more]) => {
    const allowed = r.command === WRITE || r.command === DISCARD || r.command === WRITE_ZEROES
      ? 3
      : 0;
    const bad = allowed === 0 ? 1 << bit : 1 << Math.max(2, bit);
    return { ...r, flags: (r.flags | bad | (more & ~allowed)) & 0xffff };
  }),
  // A payload length the command does not take (the payload is sent, so framing holds).
  fc.tuple(valid, fc.integer({ min: 1, max: 300 })).map(([r, extra]) => {
    const payload = { seed: extra, length: r.payload.length + extra };
    return { ...r, payload, payloadLength: payload.length };
  }),
  fc.tuple(range, fc.integer({ min: 0, max: 1000 })).map(([r, payloadLength]) =>
    request(WRITE, {
      offset: BigInt(r.offset),
      length: payloadLength === r.length ? r.length + 1 : r.length,
      payload: { seed: r.length, length: payloadLength },
    })
  ),
  // A command without a range that has one.
  fc.tuple(nonRangedCommand, fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }), u32).filter((
    [, offset, length],
  ) => offset !== 0n || length !== 0).map(([command, offset, length]) =>
    request(command, { offset, length })
  ),
  // CONTROL: a plain export has no owner to ask (ENOTSUP); outside 1 .. 4 KiB, EINVAL.
  fc.oneof(
    fc.constantFrom('{"op":"detach","leg":"a"}', "{", "null").map((text) =>
      new TextEncoder().encode(text)
    ),
    fc.uint8Array({ minLength: 0, maxLength: CONTROL_MAX + 100 }),
  ).map((payload) => request(CONTROL, { payload })),
);

const untrusted: fc.Arbitrary<RawRequest> = fc.oneof(
  fc.tuple(
    valid,
    fc.oneof(
      fc.constantFrom(MAGIC.DSTR, MAGIC.DSTC, MAGIC.DSTS, 0, 0x13956025),
      u32,
    ).filter((m) => m !== MAGIC.DSTQ),
  ).map(([r, magic]) => ({ ...r, magic })),
  fc.tuple(valid, fc.integer({ min: PAYLOAD_MAX + 1, max: 0xffffffff })).map((
    [r, payloadLength],
  ) => ({ ...r, payloadLength, payload: new Uint8Array() })),
  fc.tuple(valid, fc.bigInt({ min: 2n ** 53n, max: 2n ** 64n - 1n })).map(([r, txId]) => ({
    ...r,
    txId,
  })),
);

const frame = fc.oneof(
  { weight: 30, arbitrary: valid },
  { weight: 25, arbitrary: wellFramedBad },
  { weight: 1, arbitrary: untrusted },
);

interface Session extends Delivery {
  hello: RawHello;
  frames: RawRequest[];
  /** The first txId the session numbers its requests from; near 2^53 it runs past it. */
  txBase: number;
}

const session: fc.Arbitrary<Session> = fc.record({
  hello,
  frames: fc.array(frame, { maxLength: 50, size: "max" }),
  txBase: fc.oneof(
    { weight: 4, arbitrary: fc.constant(1) },
    { weight: 2, arbitrary: fc.integer({ min: 1, max: 2 ** 53 - 100 }) },
    { weight: 1, arbitrary: fc.integer({ min: 2 ** 53 - 40, max: 2 ** 53 - 1 }) },
  ),
  ...delivery,
});

// ---------------------------------------------------------------------------------
// Encoding

function encodeHello(h: RawHello, sessionNumber: number): Uint8Array {
  const bytes = new Uint8Array(48);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, h.magic, true);
  view.setUint16(4, h.versionMin, true);
  view.setUint16(6, h.versionMax, true);
  view.setUint32(8, h.features, true);
  view.setUint16(12, h.authMethods, true);
  view.setUint16(14, h.protections, true);
  bytes.set(h.nonce, 16);
  if (h.clientId !== null) {
    // Distinct per session: a second connection of one client would fence the first.
    bytes.set(h.clientId, 32);
    bytes[47] = sessionNumber + 1;
  }
  return bytes;
}

function encodeRequest(r: RawRequest, txId: bigint): Uint8Array {
  const payload = payloadBytes(r.payload);
  const bytes = new Uint8Array(32 + payload.length);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, r.magic, true);
  view.setUint16(4, r.command, true);
  view.setUint16(6, r.flags, true);
  view.setBigUint64(8, txId, true);
  view.setBigUint64(16, r.offset, true);
  view.setUint32(24, r.length, true);
  view.setUint32(28, r.payloadLength, true);
  bytes.set(payload, 32);
  return bytes;
}

function encodeSession(s: Session, sessionNumber: number): Uint8Array {
  const stream = new StreamBuilder();
  stream.frame(encodeHello(s.hello, sessionNumber));
  s.frames.forEach((r, i) => stream.frame(encodeRequest(r, r.txId ?? BigInt(s.txBase + i))));
  const bytes = stream.bytes();
  return s.corruption === null ? bytes : corrupt(bytes, stream.starts, s.corruption);
}

// ---------------------------------------------------------------------------------
// The oracle: what the export must do with a stream, from the spec

interface ExpectedReply {
  txId: number;
  command: number;
  error: number;
  /** A READ's length, or what the payload is; "none" for every error and most commands. */
  payload: number | "none" | "info" | "status";
}

interface Expectation extends Expected {
  /** "silent": closed without an answer; "refused": a hello with `helloStatus`, then closed. */
  hello: "silent" | "refused" | "ok";
  helloStatus: number;
  replies: ExpectedReply[];
  /** Well-framed requests refused by the spec's check order (each counted and maybe logged). */
  refused: number;
  /** A frame the export cannot trust ended the connection. */
  untrusted: boolean;
}

function expect(stream: Uint8Array): Expectation {
  const e: Expectation = {
    hello: "silent",
    helloStatus: -1,
    replies: [],
    calls: [],
    refused: 0,
    untrusted: false,
    cut: false,
  };
  const view = new DataView(stream.buffer, stream.byteOffset, stream.byteLength);
  const stopAt = (at: number) => {
    e.cut = at < stream.length;
    return e;
  };
  // The export reads the magic first and stops there when it is wrong. A stream shorter
  // than that ends at once, before NBD_GREETING_GRACE_MS (2 s): only a peer that sends no
  // byte and keeps the connection open that long is greeted as an NBD client, and no
  // fuzzing stream does, so an empty one is still not answered.
  if (stream.length < 4) return e;
  if (view.getUint32(0, true) !== MAGIC.DSTC) return stopAt(4);
  if (stream.length < 48) return e;
  const versionMin = view.getUint16(4, true);
  const versionMax = view.getUint16(6, true);
  if (versionMin > versionMax) return stopAt(48);
  // A hello that offers a key (AUTH_PSK, version 2) is followed by a 104-byte key share,
  // read before anything is answered; an export without keys then refuses a client
  // that offers only the key.
  const authMethods = view.getUint16(12, true);
  const helloEnd = (authMethods & 2) !== 0 && versionMax >= 2 ? 48 + 104 : 48;
  if (stream.length < helloEnd) return e;
  if (helloEnd > 48 && (authMethods & 1) === 0) e.helloStatus = AUTH_UNSUPPORTED;
  else if (versionMin > 1 || versionMax < 1) e.helloStatus = VERSION_UNSUPPORTED;
  else if ((authMethods & 1) === 0) e.helloStatus = AUTH_UNSUPPORTED;
  else if ((view.getUint16(14, true) & 1) === 0) e.helloStatus = PROTECTION_UNSUPPORTED;
  else e.helloStatus = STATUS_OK;
  if (e.helloStatus !== STATUS_OK) {
    e.hello = "refused";
    return stopAt(helloEnd);
  }
  e.hello = "ok";
  let at = helloEnd;
  while (stream.length - at >= 32) {
    const magic = view.getUint32(at, true);
    const payloadLength = view.getUint32(at + 28, true);
    const txHigh = view.getUint32(at + 12, true);
    if (magic !== MAGIC.DSTQ || payloadLength > PAYLOAD_MAX || txHigh >= 2 ** 21) {
      e.untrusted = true;
      return e;
    }
    if (stream.length - at < 32 + payloadLength) break; // incomplete: the stream ends inside it
    const command = view.getUint16(at + 4, true);
    const flags = view.getUint16(at + 6, true);
    const txId = txHigh * TWO_32 + view.getUint32(at + 8, true);
    const offsetHigh = view.getUint32(at + 20, true);
    const offset = offsetHigh >= 2 ** 21
      ? null
      : offsetHigh * TWO_32 + view.getUint32(at + 16, true);
    const length = view.getUint32(at + 24, true);
    const payload = stream.subarray(at + 32, at + 32 + payloadLength);
    at += 32 + payloadLength;
    const error = refusal(command, flags, offset, length, payloadLength);
    if (error !== null) {
      e.refused += 1;
      e.replies.push({ txId, command, error, payload: "none" });
      continue;
    }
    const reply = (error: number, payload: ExpectedReply["payload"] = "none") =>
      e.replies.push({ txId, command, error, payload });
    switch (command) {
      case READ:
        reply(0, length);
        break;
      case WRITE:
        e.calls.push({ kind: "write", offset: offset!, length, data: payload.slice() });
        reply(0);
        break;
      case DISCARD:
        e.calls.push({ kind: "discard", offset: offset!, length, data: null });
        reply(0);
        break;
      case WRITE_ZEROES:
        e.calls.push({ kind: "zeroes", offset: offset!, length, data: null });
        reply(0);
        break;
      case INFO:
        reply(0, "info");
        break;
      case STATUS:
        reply(0, "status");
        break;
      case CONTROL:
        reply(ENOTSUP); // a plain export has no owner to run it
        break;
      default: // FLUSH, PING
        reply(0);
    }
  }
  return e;
}

/** The spec's check order ("Error codes"), for a writable export of SIZE bytes. */
function refusal(
  command: number,
  flags: number,
  offset: number | null,
  length: number,
  payloadLength: number,
): number | null {
  if (command < READ || command > CONTROL) return ENOTSUP;
  const accepted = command === WRITE || command === DISCARD || command === WRITE_ZEROES ? 3 : 0;
  if ((flags & ~accepted) !== 0) return EINVAL;
  const payloadOk = command === WRITE
    ? payloadLength === length
    : command === CONTROL
    ? payloadLength >= 1 && payloadLength <= CONTROL_MAX
    : payloadLength === 0;
  if (!payloadOk) return EINVAL;
  if (RANGED.includes(command)) {
    if (offset === null || length === 0) return EINVAL;
    if (length > (command === READ || command === WRITE ? PAYLOAD_MAX : RANGE_MAX)) return EINVAL;
    if (offset + length > SIZE) return command === READ ? EINVAL : ENOSPC;
  } else if (offset !== 0 || length !== 0) {
    return EINVAL;
  }
  return null;
}

/** Checks the export's whole output to one connection against the oracle. */
function checkReplies(out: OutputReader, e: Expectation): void {
  const output = out.bytes;
  if (e.hello === "silent") {
    assert.equal(output.length, 0, "a hello the export must not answer was answered");
    return;
  }
  const hello = out.take(112, "the server hello");
  assert.equal(hello.getUint32(0, true), MAGIC.DSTS, "server hello magic");
  assert.equal(hello.getUint16(4, true), 1, "server hello version");
  assert.equal(hello.getUint16(6, true), e.helloStatus, "server hello status");
  if (e.hello === "refused") {
    const reasonLength = out.take(2, "the refusal reason's length").getUint16(0, true);
    assert.ok(reasonLength <= 512, `a refusal reason of ${reasonLength} bytes`);
    out.take(reasonLength, "the refusal reason");
    assert.equal(out.remaining, 0, "bytes after a refused hello");
    return;
  }
  assert.equal(hello.getUint32(8, true), 1, "features: SHARED_WRITERS");
  assert.equal(hello.getBigUint64(16, true), BigInt(SIZE), "export size");
  assert.equal(hello.getUint32(24, true), 4096, "block size");
  assert.equal(hello.getUint32(28, true), 0, "export flags");
  assert.equal(hello.getUint32(32, true), PAYLOAD_MAX, "payloadBytesMax");
  assert.equal(hello.getUint32(36, true), 128, "inFlightMax");

  const pending = new Map<number, ExpectedReply[]>();
  for (const reply of e.replies) {
    const list = pending.get(reply.txId) ?? [];
    list.push(reply);
    pending.set(reply.txId, list);
  }
  while (out.remaining > 0) {
    const at = out.position;
    const header = out.take(24, "a reply header");
    assert.equal(header.getUint32(0, true), MAGIC.DSTR, `reply magic at byte ${at}`);
    const command = header.getUint16(4, true);
    const txId = Number(header.getBigUint64(8, true));
    const error = header.getUint32(16, true);
    const payloadLength = header.getUint32(20, true);
    const what = `the reply at byte ${at} (txId ${txId}, command ${command}, error ${error})`;
    assert.equal(header.getUint16(6, true), 0, `${what}: reserved field`);
    const candidates = pending.get(txId) ?? [];
    const index = candidates.findIndex((r) => r.command === command && r.error === error);
    assert.ok(
      index >= 0,
      `${what} answers no request; expected for this txId: ${JSON.stringify(candidates)}`,
    );
    const expected = candidates.splice(index, 1)[0]!;
    if (candidates.length === 0) pending.delete(txId);
    const payload = out.take(payloadLength, `${what}'s payload`);
    if (typeof expected.payload === "number") {
      assert.equal(payloadLength, expected.payload, `${what}: payload length`);
    } else if (expected.payload === "none") {
      assert.equal(payloadLength, 0, `${what}: payload length`);
    } else if (expected.payload === "info") {
      assert.equal(payloadLength, 16, `${what}: INFO payload length`);
      assert.equal(payload.getBigUint64(0, true), BigInt(SIZE), `${what}: INFO size`);
      assert.equal(payload.getUint32(8, true), 4096, `${what}: INFO block size`);
      assert.equal(payload.getUint32(12, true), 0, `${what}: INFO flags`);
    } else {
      const text = new TextDecoder().decode(
        new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength),
      );
      const status = JSON.parse(text);
      assert.equal(status.kind, "export", `${what}: STATUS kind`);
      assert.equal(status.sizeBytes, SIZE, `${what}: STATUS size`);
    }
  }
  const missing = [...pending.values()].flat();
  if (out.complete) assert.deepEqual(missing, [], "requests the export never answered");
}

/**
 * What the export logs about a connection: one line when it closes it or refuses the hello,
 * and one per refused request, at most 5.
 */
function checkLog(log: RecordingLogger, peer: string, e: Expectation, where: string): void {
  const closing = log.warnings(peer, /closing this connection/);
  assert.equal(closing.length, e.untrusted ? 1 : 0, `${where}: ${closing.join(" | ")}`);
  const refusedHello = log.warnings(peer, /handshake refused/);
  assert.equal(refusedHello.length, e.hello === "ok" ? 0 : 1, `${where}: hello log`);
  const refusedRequests = log.warnings(peer, /refused request/);
  assert.equal(refusedRequests.length, Math.min(5, e.refused), `${where}: refusals logged`);
}

/**
 * STATUS counts every refused request, broken frame and refused hello in `errors` (checked
 * when no connection was dropped, as a dropped one's count is not known).
 */
function checkStatus(exporter: Exporter, sessions: Session[], expectations: Expectation[]): void {
  if (sessions.every((s) => s.ending === "half-close")) {
    const errors = expectations.reduce(
      (sum, e) => sum + (e.hello === "ok" ? 0 : 1) + e.refused + (e.untrusted ? 1 : 0),
      0,
    );
    assert.equal(exporter.status().errors, errors, "STATUS errors");
  }
}

// ---------------------------------------------------------------------------------
// A well-behaved client: RawClient, one request at a time, txIds counting from 1

class DstClient implements PlainClient {
  #txId = 0;
  private constructor(readonly client: RawClient) {}

  static async connect(address: HostPort): Promise<DstClient> {
    return new DstClient(await RawClient.connect(address));
  }

  async ping(): Promise<void> {
    await this.#ask(Command.PING, 0, 0);
  }

  read(offset: number, length: number): Promise<Uint8Array> {
    return this.#ask(Command.READ, offset, length);
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    await this.#ask(Command.WRITE, offset, data.length, data);
  }

  close(): void {
    this.client.close();
  }

  /** One request and its reply, bounded. */
  #ask(command: number, offset: number, length: number, payload?: Uint8Array) {
    const txId = ++this.#txId;
    const h = {
      command,
      flags: 0,
      txId,
      offset,
      length,
      payloadLength: command === Command.WRITE ? length : 0,
    };
    const what = `the reply to a well-behaved client's command ${command}`;
    return within(
      WAIT_MS,
      what,
      (async () => {
        await this.client.send(RawClient.frame(h, payload));
        const reply = await this.client.reply();
        assert.equal(reply.header.txId, txId, `${what}: txId`);
        assert.equal(reply.header.error, WireError.OK, `${what}: error`);
        return reply.payload;
      })(),
      () => this.client.close(),
    );
  }
}

// ---------------------------------------------------------------------------------

Deno.test("DST frame fuzzing: no crash, no hang, no write outside the device, other clients served", async () => {
  await fuzzFrames({
    server: "export",
    handshake: "handshake",
    size: SIZE,
    session,
    serve: (device, listener, log) =>
      Exporter.serve(device, listener, {
        log,
        // Concurrent fuzzing writers would otherwise race for the lease.
        lease: new WriterLease(new MemoryGeneration(), true),
      }),
    connect: (address) => DstClient.connect(address),
    encode: encodeSession,
    expect,
    checkReplies,
    checkLog,
    checkServer: checkStatus,
  });
});
