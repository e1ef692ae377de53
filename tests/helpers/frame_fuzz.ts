/**
 * What the frame fuzz tests of both protocols share (tests/property/*_frame_fuzz_test.ts):
 * the run itself (fuzzFrames: a server of a guarded device, fuzzing connections, a
 * bystander and a new client, and the checks that do not depend on the protocol), the
 * generators of ranges and offsets for a device of a given size, a device wrapper that
 * catches any call outside the device, a logger that keeps its lines, a fuzzing
 * connection that sends a byte stream in random pieces and collects everything the
 * server answers, stream corruptions (bytes flipped, a cut, garbage from half-way), and
 * bounded waits, so a hang fails the test instead of stalling it. Each protocol's test
 * keeps its own oracle: its frames, what the server must answer, and what it must log.
 */

import assert from "node:assert/strict";
import fc from "fast-check";
import type { BlockDevice, DeviceStats, IoFlags } from "../../src/device/block_device.ts";
import { MemoryDevice } from "../../src/device/memory_device.ts";
import { formatHostPort, type HostPort } from "../../src/lib/address.ts";
import type { Logger } from "../../src/lib/log.ts";
import type { AcceptedConn, ConnListener } from "../../src/transport/accept_loop.ts";
import { closeQuietly, writeAll } from "../../src/transport/byte_conn.ts";
import { assertSameBytes, concat } from "./bytes.ts";
import { replayOptions, seededBytes } from "./property.ts";

/** How long a fuzzing run waits for any one thing (an answer, a close, a shutdown). */
export const WAIT_MS = 5000;

/** Resolves as `promise`, or throws a "hang" error naming `what` after `ms` (then runs `onTimeout`). */
export async function within<T>(
  ms: number,
  what: string,
  promise: Promise<T>,
  onTimeout: () => void = () => {},
): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      onTimeout();
      reject(new Error(`hang: ${what} did not happen within ${ms} ms`));
    }, ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Polls `condition` every few milliseconds; throws a "hang" error naming `what` after `ms`. */
export async function eventually(ms: number, what: string, condition: () => boolean) {
  const deadline = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`hang: ${what} did not happen within ${ms} ms`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

/**
 * A TCP listener on 127.0.0.1 whose connections count when the server closes them.
 * A dropped connection's requests may still run after the fuzzer has gone, and only
 * the server closing its side says they are over: both servers close a connection
 * once nothing of it is in flight, and a handshake that ends closes it too.
 */
export class TrackingListener implements ConnListener {
  readonly #inner = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  /** Connections accepted, and how many of them the server has closed. */
  accepted = 0;
  closed = 0;

  get addr(): Deno.Addr {
    return this.#inner.addr;
  }

  get address(): HostPort {
    return { hostname: this.#inner.addr.hostname, port: this.#inner.addr.port };
  }

  async accept(): Promise<AcceptedConn> {
    const conn = await this.#inner.accept();
    this.accepted += 1;
    let closed = false;
    return {
      read: (into: Uint8Array) => conn.read(into),
      write: (data: Uint8Array) => conn.write(data),
      close: () => {
        if (!closed) this.closed += 1;
        closed = true;
        conn.close();
      },
      remoteAddr: conn.remoteAddr,
      setNoDelay: (on?: boolean) => conn.setNoDelay(on),
      closeWrite: () => conn.closeWrite(),
    } as AcceptedConn;
  }

  close(): void {
    this.#inner.close();
  }

  /**
   * Waits until `count` connections were accepted and the server closed all but `open`
   * of them; a connection it never closes is a hang.
   */
  async settled(count: number, open: number, ms: number): Promise<void> {
    await eventually(
      ms,
      `the server's end of ${count - open} connection(s) (accepted ${this.accepted}, ` +
        `closed ${this.closed})`,
      () => this.accepted >= count && this.accepted - this.closed === open,
    );
  }
}

/** A data-changing call that reached the device. */
export interface DeviceCall {
  kind: "write" | "discard" | "zeroes";
  offset: number;
  length: number;
  /** A copy of a write's data as the device got it; null for discard and write-zeroes. */
  data: Uint8Array | null;
}

/**
 * A MemoryDevice that records every call reaching it before passing it on: the server's
 * own range checks are what is under test, and the MemoryDevice would refuse a bad range
 * itself (with the very error code the server should have answered), so only a record
 * taken in front of it shows that a bad range got through.
 */
export class GuardDevice implements BlockDevice {
  /** Data-changing calls in the order they reached the device. */
  readonly calls: DeviceCall[] = [];
  /** Every call of any kind whose range was not inside [0, size). */
  readonly outside: string[] = [];

  /** The same device as `inner`, typed as any device, so flags pass through unchanged. */
  readonly #device: BlockDevice;

  constructor(readonly inner: MemoryDevice) {
    this.#device = inner;
  }

  get info() {
    return this.inner.info;
  }

  read(offset: number, into: Uint8Array): Promise<void> {
    this.#check("read", offset, into.length);
    return this.#device.read(offset, into);
  }

  write(offset: number, data: Uint8Array, flags?: IoFlags): Promise<void> {
    this.#check("write", offset, data.length);
    this.calls.push({ kind: "write", offset, length: data.length, data: data.slice() });
    return this.#device.write(offset, data, flags);
  }

  flush(): Promise<void> {
    return this.#device.flush();
  }

  discard(offset: number, length: number, flags?: IoFlags): Promise<void> {
    this.#check("discard", offset, length);
    this.calls.push({ kind: "discard", offset, length, data: null });
    return this.#device.discard(offset, length, flags);
  }

  writeZeroes(offset: number, length: number, flags?: IoFlags): Promise<void> {
    this.#check("write-zeroes", offset, length);
    this.calls.push({ kind: "zeroes", offset, length, data: null });
    return this.#device.writeZeroes(offset, length, flags);
  }

  stats(): DeviceStats {
    return this.inner.stats();
  }

  close(): Promise<void> {
    return this.inner.close();
  }

  #check(what: string, offset: number, length: number): void {
    const size = this.inner.info.sizeBytes;
    if (
      !Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 ||
      length < 0 || offset + length > size
    ) {
      this.outside.push(`${what} of ${length} bytes at offset ${offset} (the device is ${size})`);
    }
  }
}

/** The bytes `initial` becomes when `calls` are applied in order: what the device must hold. */
export function applyCalls(initial: Uint8Array, calls: DeviceCall[]): Uint8Array {
  const bytes = initial.slice();
  for (const call of calls) {
    if (call.data !== null) bytes.set(call.data, call.offset);
    else bytes.fill(0, call.offset, call.offset + call.length);
  }
  return bytes;
}

function callKey(call: DeviceCall): string {
  let hash = 0x811c9dc5;
  for (const byte of call.data ?? []) hash = Math.imul(hash ^ byte, 0x01000193) >>> 0;
  return `${call.kind} of ${call.length} bytes at ${call.offset} (data ${hash.toString(16)})`;
}

/**
 * Checks that the calls which reached the device are the valid requests sent, as
 * multisets: every one in `must` (requests the server answered, or had to), none that
 * is in neither list, and from `may` at most once each (requests of a connection the
 * fuzzer dropped, which the server may or may not have read). Returns what is wrong.
 */
export function unexpectedCalls(
  recorded: DeviceCall[],
  must: DeviceCall[],
  may: DeviceCall[],
): string[] {
  const count = (calls: DeviceCall[]) => {
    const counts = new Map<string, number>();
    for (const call of calls) {
      const key = callKey(call);
      counts.set(key, (counts.get(key) ?? 0) + 1);
    }
    return counts;
  };
  const seen = count(recorded);
  const needed = count(must);
  const allowed = count(may);
  const problems: string[] = [];
  for (const [key, n] of needed) {
    if ((seen.get(key) ?? 0) < n) problems.push(`valid request never reached the device: ${key}`);
  }
  for (const [key, n] of seen) {
    if (n > (needed.get(key) ?? 0) + (allowed.get(key) ?? 0)) {
      problems.push(`the device got a call no valid request asked for: ${key}`);
    }
  }
  return problems;
}

/** A logger that keeps its lines, so a test can count what the server said about a peer. */
export class RecordingLogger implements Logger {
  readonly lines: Array<{ level: string; message: string }> = [];
  debug(message: string): void {
    this.lines.push({ level: "debug", message });
  }
  info(message: string): void {
    this.lines.push({ level: "info", message });
  }
  warn(message: string): void {
    this.lines.push({ level: "warn", message });
  }
  error(message: string): void {
    this.lines.push({ level: "error", message });
  }

  /** Warning lines about `peer` whose text matches `pattern`. */
  warnings(peer: string, pattern: RegExp): string[] {
    return this.lines
      .filter((line) => line.level === "warn" && line.message.startsWith(`${peer}: `))
      .map((line) => line.message)
      .filter((message) => pattern.test(message));
  }

  /** Every line about `peer`, with its level: what a failure report shows of the server's side. */
  about(peer: string): string {
    return this.lines
      .filter((line) => line.message.startsWith(`${peer}: `))
      .map((line) => `${line.level} ${line.message}`)
      .join("\n");
  }

  errors(): string[] {
    return this.lines.filter((line) => line.level === "error").map((line) => line.message);
  }
}

/**
 * How a fuzzing connection ends: "half-close" ends its stream (as a client that sent
 * its last frame does) and reads everything until the server closes, which it must;
 * "abort" closes the socket outright, reading nothing.
 */
export type Ending = "half-close" | "abort";

export interface SessionOutcome {
  /** Everything the server sent, in order (nothing for "abort"). */
  output: Uint8Array;
  /**
   * The connection ended with a reset, not an end of stream. A server that closes while
   * bytes it never read are waiting makes its kernel send a reset, which may discard
   * what it had sent and the fuzzer had not read yet (the read may even end as if the
   * stream had ended). It happens only when the server stopped reading before the end.
   */
  reset: boolean;
  /** How the server names this connection in its log lines. */
  peer: string;
}

/** The server may send this much to one fuzzing connection; more is a runaway reply. */
const OUTPUT_BYTES_MAX = 64 * 1024 * 1024;

/** What readToEnd got. */
export interface Received {
  bytes: Uint8Array;
  /** The read ended with a reset, not an end of stream (see SessionOutcome.reset). */
  reset: boolean;
  /** More than the limit arrived: reading stopped there. */
  overLimit: boolean;
}

/**
 * Reads `conn` until the other side ends its stream, the connection is reset, or more
 * than `limit` bytes arrived. Never rejects, so it needs no handler while a sender runs.
 */
export async function readToEnd(conn: Deno.Conn, limit = Infinity): Promise<Received> {
  const parts: Uint8Array[] = [];
  const buffer = new Uint8Array(256 * 1024);
  let total = 0;
  let reset = false;
  let overLimit = false;
  for (;;) {
    let n: number | null;
    try {
      n = await conn.read(buffer);
    } catch {
      reset = true; // the server closed with our bytes unread: see SessionOutcome.reset
      break;
    }
    if (n === null) break;
    parts.push(buffer.slice(0, n));
    total += n;
    if (total > limit) {
      overLimit = true;
      break;
    }
  }
  return { bytes: concat(...parts), reset, overLimit };
}

/**
 * Connects to `address`, sends `bytes` in pieces cut by a PRNG from `chunkSeed` (so a
 * frame arrives split at any byte), then ends as `ending` says. The server may close
 * first (that is its answer to a frame it cannot trust): the rest is not sent. Every
 * wait is bounded by `ms` in all; past it the test fails with "hang".
 */
export async function runSession(
  address: HostPort,
  bytes: Uint8Array,
  chunkSeed: number,
  ending: Ending,
  ms: number,
): Promise<SessionOutcome> {
  const conn = await within(ms, "connecting", Deno.connect(address));
  const peer = formatHostPort(conn.localAddr as Deno.NetAddr);
  conn.setNoDelay(true);
  const reading: Promise<Received> = ending === "abort"
    ? Promise.resolve({ bytes: new Uint8Array(), reset: false, overLimit: false })
    : readToEnd(conn, OUTPUT_BYTES_MAX);
  const sending = async () => {
    let x = chunkSeed | 1;
    const next = () => {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      return x >>> 0;
    };
    let at = 0;
    while (at < bytes.length) {
      const roll = next() % 8;
      const piece = roll < 3 ? 1 + next() % 40 : roll < 6 ? 1 + next() % 5000 : bytes.length;
      const end = Math.min(bytes.length, at + piece);
      try {
        await writeAll(conn, bytes.subarray(at, end));
      } catch {
        return; // the server closed: what is left is not read by anyone
      }
      at = end;
      // Now and then the server gets a turn to parse a partial frame before the rest comes.
      if (next() % 4 === 0) await new Promise((resolve) => setTimeout(resolve, 0));
    }
  };
  try {
    await within(
      ms,
      `sending ${bytes.length} bytes and ending the stream`,
      (async () => {
        await sending();
        if (ending === "abort") {
          closeQuietly(conn);
          return;
        }
        try {
          await conn.closeWrite();
        } catch {
          // Already closed by the server.
        }
        await reading;
      })(),
      () => closeQuietly(conn),
    );
  } finally {
    closeQuietly(conn);
    await reading;
  }
  const { bytes: output, reset, overLimit } = await reading;
  if (overLimit) throw new Error(`the server sent more than ${OUTPUT_BYTES_MAX} bytes`);
  return { output, peer, reset };
}

// ---------------------------------------------------------------------------------
// Generators both protocols' streams are made of

export const u16: fc.Arbitrary<number> = fc.integer({ min: 0, max: 0xffff });
export const u32: fc.Arbitrary<number> = fc.integer({ min: 0, max: 0xffffffff });

/** `length` bytes made from `seed` (so a counterexample prints short), or the bytes given. */
export type Payload = { seed: number; length: number } | Uint8Array;

export function payloadBytes(payload: Payload): Uint8Array {
  return payload instanceof Uint8Array ? payload : seededBytes(payload.seed, payload.length);
}

/** A byte range on a device. */
export interface Range {
  offset: number;
  length: number;
}

/** In-range ranges of a device of `size` bytes, mostly small, some up to the whole device. */
export function rangeIn(size: number): fc.Arbitrary<Range> {
  return fc.record({
    offset: fc.nat({ max: size - 1 }),
    length: fc.oneof(
      fc.integer({ min: 1, max: 64 }),
      fc.integer({ min: 1, max: 8192 }),
      fc.integer({ min: 1, max: size }),
    ),
  }).map(({ offset, length }) => ({ offset, length: Math.min(length, size - offset) }));
}

/** Ranges that end past a device of `size` bytes. */
export function pastEnd(size: number): fc.Arbitrary<Range> {
  return fc.record({
    offset: fc.oneof(fc.constantFrom(0, size - 1, size), fc.integer({ min: 0, max: size + 4096 })),
    // Often by a byte or a few, where an off-by-one in a range check shows.
    over: fc.oneof(
      fc.constant(1),
      fc.integer({ min: 1, max: 16 }),
      fc.integer({ min: 1, max: 9000 }),
    ),
  }).map(({ offset, over }) => ({ offset, length: Math.max(1, size - offset + over) }));
}

/** Offsets a careless sum overflows at: around 2^53 and up to 2^64 - 1. */
export const hugeOffset: fc.Arbitrary<bigint> = fc.oneof(
  fc.constantFrom(2n ** 53n - 1n, 2n ** 53n, 2n ** 53n + 1n, 2n ** 63n, 2n ** 64n - 1n),
  fc.bigInt({ min: 2n ** 53n - 100_000n, max: 2n ** 53n + 100_000n }),
  fc.bigInt({ min: 2n ** 64n - 100_000n, max: 2n ** 64n - 1n }),
  fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
);

/**
 * Where in a stream a corruption starts: in frame `frame` (a fraction of the frame
 * count, so shrinking keeps it meaningful) at byte `within` of it, which is usually
 * inside its header; the start of a frame is known from the stream's frame starts.
 */
export interface Place {
  frame: number;
  within: number;
}

/** Ways a valid stream is turned invalid part-way. */
export type Corruption =
  | { kind: "flip"; at: Place; masks: number[] }
  | { kind: "cut"; at: Place }
  | { kind: "garbage"; at: Place; garbage: Uint8Array }
  | { kind: "insert"; at: Place; garbage: Uint8Array };

const place: fc.Arbitrary<Place> = fc.record({
  frame: fc.double({ min: 0, max: 1, noNaN: true, maxExcluded: true }),
  within: fc.oneof(fc.nat({ max: 40 }), fc.nat({ max: 5000 })),
});

export const corruption: fc.Arbitrary<Corruption> = fc.oneof(
  fc.record({
    kind: fc.constant("flip" as const),
    at: place,
    masks: fc.array(fc.integer({ min: 1, max: 255 }), { minLength: 1, maxLength: 6 }),
  }),
  fc.record({ kind: fc.constant("cut" as const), at: place }),
  fc.record({
    kind: fc.constant("garbage" as const),
    at: place,
    garbage: fc.uint8Array({ minLength: 1, maxLength: 200 }),
  }),
  fc.record({
    kind: fc.constant("insert" as const),
    at: place,
    garbage: fc.uint8Array({ minLength: 1, maxLength: 40 }),
  }),
);

/** How a fuzzing session's stream is delivered, whatever the protocol. */
export interface Delivery {
  corruption: Corruption | null;
  /** Seeds how the stream is cut into pieces (see runSession). */
  chunkSeed: number;
  ending: Ending;
}

/**
 * The generators of a Delivery's fields, to spread last into a session's fc.record: a
 * third of the streams corrupted, and one in ten connections dropped.
 */
export const delivery = {
  corruption: fc.oneof(
    { weight: 2, arbitrary: fc.constant(null) },
    { weight: 1, arbitrary: corruption },
  ),
  chunkSeed: fc.integer(),
  ending: fc.oneof(
    { weight: 9, arbitrary: fc.constant("half-close" as const) },
    { weight: 1, arbitrary: fc.constant("abort" as const) },
  ),
};

/**
 * `bytes` with `c` applied; `starts` are the stream's frame starts (the first is 0).
 * A flip XORs consecutive bytes, a cut ends the stream there (the connection closes
 * mid-frame), garbage replaces everything from there on, insert puts bytes in between.
 */
export function corrupt(bytes: Uint8Array, starts: number[], c: Corruption): Uint8Array {
  const frameStart = starts[Math.floor(c.at.frame * starts.length)] ?? 0;
  const at = Math.min(bytes.length, frameStart + c.at.within);
  switch (c.kind) {
    case "flip": {
      const out = bytes.slice();
      c.masks.forEach((mask, i) => {
        if (at + i < out.length) out[at + i]! ^= mask;
      });
      return out;
    }
    case "cut":
      return bytes.slice(0, at);
    case "garbage": {
      const out = new Uint8Array(at + c.garbage.length);
      out.set(bytes.subarray(0, at));
      out.set(c.garbage, at);
      return out;
    }
    case "insert": {
      const out = new Uint8Array(bytes.length + c.garbage.length);
      out.set(bytes.subarray(0, at));
      out.set(c.garbage, at);
      out.set(bytes.subarray(at), at + c.garbage.length);
      return out;
    }
  }
}

/** Appends byte pieces and remembers where each frame starts. */
export class StreamBuilder {
  readonly #parts: Uint8Array[] = [];
  readonly starts: number[] = [];
  #length = 0;

  /** Starts a frame: later corruptions may be placed relative to it. */
  frame(...parts: Uint8Array[]): void {
    this.starts.push(this.#length);
    for (const part of parts) this.add(part);
  }

  add(part: Uint8Array): void {
    this.#parts.push(part);
    this.#length += part.length;
  }

  bytes(): Uint8Array {
    const out = new Uint8Array(this.#length);
    let at = 0;
    for (const part of this.#parts) {
      out.set(part, at);
      at += part.length;
    }
    return out;
  }
}

/**
 * What OutputReader throws when a cut-short output ends: the reply it was reading
 * never arrived whole, and nothing more can be checked.
 */
export class OutputCut extends Error {}

/**
 * Reads a server's output front to back; each read says what it expected when too
 * little is left. A `complete` output ending early is a failure; one cut short by a
 * reset (see SessionOutcome.reset) just ends there, with OutputCut.
 */
export class OutputReader {
  #at = 0;
  constructor(readonly bytes: Uint8Array, readonly complete: boolean) {}

  get remaining(): number {
    return this.bytes.length - this.#at;
  }

  get position(): number {
    return this.#at;
  }

  take(length: number, what: string): DataView {
    if (this.remaining < length) {
      const message = `the server's output ends at byte ${this.bytes.length}, in the middle ` +
        `of ${what} (${this.remaining} of ${length} bytes there)`;
      throw this.complete ? new Error(message) : new OutputCut(message);
    }
    const view = new DataView(this.bytes.buffer, this.bytes.byteOffset + this.#at, length);
    this.#at += length;
    return view;
  }
}

/**
 * Runs `check` on a reader of a server's whole output to one connection. An output that
 * is not `complete` (a reset may have cut it short) is checked as far as it goes.
 */
export function checkOutput(
  output: Uint8Array,
  complete: boolean,
  check: (out: OutputReader) => void,
): void {
  try {
    check(new OutputReader(output, complete));
  } catch (error) {
    if (!(error instanceof OutputCut)) throw error;
  }
}

// ---------------------------------------------------------------------------------
// The run

/** What both protocols' oracles say about one connection, as far as fuzzFrames checks it. */
export interface Expected {
  /** The data-changing calls the valid requests make. */
  calls: DeviceCall[];
  /**
   * The server stops reading in the handshake, before the stream's end, and closes with
   * bytes unread: its kernel then resets the connection, and the reset may drop what it
   * sent last. (After the handshake it reads to the client's end before it closes.)
   */
  cut: boolean;
}

/** A well-behaved client: each call is one request and its reply, bounded by WAIT_MS. */
export interface PlainClient {
  /** A request that changes no data and is answered at once (DST PING, NBD FLUSH). */
  ping(): Promise<void>;
  read(offset: number, length: number): Promise<Uint8Array>;
  write(offset: number, data: Uint8Array): Promise<void>;
  close(): void;
}

/** A server under fuzzing: it can be shut down. */
export interface Shutdown {
  shutdown(): Promise<void>;
}

/** One protocol's part of a frame fuzzing run: what fuzzFrames cannot know by itself. */
export interface FrameFuzzing<S extends Delivery, E extends Expected, Server extends Shutdown> {
  /** What failure messages call the server ("export") and its handshake ("handshake"). */
  server: string;
  handshake: string;
  /** The device's size in bytes. */
  size: number;
  session: fc.Arbitrary<S>;
  /** Serves `device` on `listener`, logging to `log`. */
  serve(device: GuardDevice, listener: TrackingListener, log: RecordingLogger): Server;
  /**
   * A well-behaved client that has done its handshake: the bystander, connected before
   * the fuzzing and kept open through it, or the newcomer, connected after it.
   */
  connect(address: HostPort, who: "bystander" | "newcomer"): Promise<PlainClient>;
  /** Session number `index`'s stream. */
  encode(session: S, index: number): Uint8Array;
  /** The oracle: what the server must do with a stream. */
  expect(stream: Uint8Array): E;
  /** Checks the server's output to a connection that ended its stream against the oracle. */
  checkReplies(out: OutputReader, e: E): void;
  /** Checks what the server logged about that connection (`where` names it in failures). */
  checkLog(log: RecordingLogger, peer: string, e: E, where: string): void;
  /** Checks the server itself once the device was checked; given every session. */
  checkServer?(server: Server, sessions: S[], expectations: E[]): void;
}

/** One generated run: the fuzzing sessions, the device's initial bytes, the new client's write. */
interface FuzzRun<S> {
  sessions: S[];
  deviceSeed: number;
  checker: [Range, number];
}

/**
 * Fuzzes a server of `p.size` bytes with `p.session`s, 300 runs (or the one DST_SEED and
 * DST_PATH name). Each run serves a MemoryDevice of seeded bytes behind a GuardDevice,
 * connects a bystander, sends 1 to 3 sessions at once, waits until the server closed
 * each of them, and checks: no call outside the device; each connection that ended its
 * stream got what the oracle says (`checkReplies`) and logged it (`checkLog`); the calls
 * that reached the device are the valid requests' (a dropped connection's may be
 * missing); the device holds its initial bytes with them applied; the bystander is
 * still served and reads the same; a new client writes and reads its data back; no
 * error-level log line; the server shuts down within WAIT_MS.
 */
export async function fuzzFrames<S extends Delivery, E extends Expected, Server extends Shutdown>(
  p: FrameFuzzing<S, E, Server>,
): Promise<void> {
  const run: fc.Arbitrary<FuzzRun<S>> = fc.record({
    sessions: fc.array(p.session, { minLength: 1, maxLength: 3 }),
    deviceSeed: fc.integer(),
    checker: fc.tuple(rangeIn(p.size), fc.integer()),
  });
  await fc.assert(
    fc.asyncProperty(run, (r) => fuzzOnce(p, r)),
    // A hang costs seconds per run while fast-check shrinks it: past 90 s it reports the
    // smallest failure found so far.
    { ...replayOptions(300), interruptAfterTimeLimit: 90_000 },
  );
}

async function fuzzOnce<S extends Delivery, E extends Expected, Server extends Shutdown>(
  p: FrameFuzzing<S, E, Server>,
  { sessions, deviceSeed, checker }: FuzzRun<S>,
): Promise<void> {
  const memory = new MemoryDevice(p.size);
  memory.bytes.set(seededBytes(deviceSeed, p.size));
  const initial = memory.bytes.slice();
  const device = new GuardDevice(memory);
  const log = new RecordingLogger();
  const listener = new TrackingListener();
  const server = p.serve(device, listener, log);
  let failed = true;
  let bystander: PlainClient | null = null;
  try {
    bystander = await within(
      WAIT_MS,
      `the bystander's ${p.handshake}`,
      p.connect(listener.address, "bystander"),
    );
    await bystander.ping();

    const streams = sessions.map((s, i) => p.encode(s, i));
    const outcomes = await Promise.all(
      sessions.map((s, i) =>
        runSession(listener.address, streams[i]!, s.chunkSeed, s.ending, WAIT_MS)
      ),
    );
    // A dropped connection's requests may still be running: wait until it has ended.
    await listener.settled(1 + sessions.length, 1, WAIT_MS);
    // First what matters most, so it is what a failure reports.
    assert.deepEqual(device.outside, [], `outside the device: ${device.outside.join("; ")}`);

    const expectations = streams.map((stream) => p.expect(stream));
    const must: DeviceCall[] = [];
    const may: DeviceCall[] = [];
    sessions.forEach((s, i) => {
      const e = expectations[i]!;
      const { output, peer, reset } = outcomes[i]!;
      if (s.ending === "abort") {
        may.push(...e.calls);
        return;
      }
      must.push(...e.calls);
      const where = `connection ${i} (${peer}, ${streams[i]!.length} bytes sent)`;
      try {
        // Of an output that may be cut short (see Expected.cut), what arrived is checked.
        assert.ok(!reset || e.cut, `a reset, though the ${p.server} read the whole stream`);
        checkOutput(output, !e.cut, (out) => p.checkReplies(out, e));
      } catch (error) {
        const said = log.about(peer);
        throw new Error(`${where}: ${(error as Error).message}\nthe server logged:\n${said}`, {
          cause: error,
        });
      }
      p.checkLog(log, peer, e, where);
    });
    const wrong = unexpectedCalls(device.calls, must, may);
    assert.deepEqual(wrong, [], wrong.join("; "));
    assert.equal(memory.bytes.length, p.size, "the device's size");
    const model = applyCalls(initial, device.calls);
    assertSameBytes(memory.bytes, model, "the device after the fuzzing");
    p.checkServer?.(server, sessions, expectations);

    // Other clients: the bystander kept its connection through all of it.
    await bystander.ping();
    const whole = await bystander.read(0, p.size);
    assertSameBytes(whole, model, "the bystander's read of the whole device");
    const [r, seed] = checker;
    const newcomer = await within(
      WAIT_MS,
      `a new client's ${p.handshake}`,
      p.connect(listener.address, "newcomer"),
    );
    try {
      const data = seededBytes(seed, r.length);
      await newcomer.write(r.offset, data);
      const back = await newcomer.read(r.offset, r.length);
      assertSameBytes(back, data, "a new client's write read back");
    } finally {
      newcomer.close();
    }
    assert.deepEqual(log.errors(), [], "error-level log lines");
    failed = false;
  } finally {
    bystander?.close();
    // After a failure the server may be stuck (that may be the failure): it gets a short
    // while to shut down, and the failure is what is reported.
    const shutdown = within(
      failed ? 1000 : WAIT_MS,
      `the ${p.server}'s shutdown`,
      server.shutdown(),
    );
    await (failed ? shutdown.catch(() => {}) : shutdown);
  }
}
