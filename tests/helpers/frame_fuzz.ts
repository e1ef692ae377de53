/**
 * What the frame fuzz tests of both protocols share (tests/property/*_frame_fuzz_test.ts):
 * a device wrapper that catches any call outside the device, a logger that keeps its
 * lines, a fuzzing connection that sends a byte stream in random pieces and collects
 * everything the server answers, stream corruptions (bytes flipped, a cut, garbage
 * from half-way), and bounded waits, so a hang fails the test instead of stalling it.
 */

import fc from "fast-check";
import type { BlockDevice, DeviceStats, IoFlags } from "../../src/device/block_device.ts";
import type { MemoryDevice } from "../../src/device/memory_device.ts";
import { formatHostPort, type HostPort } from "../../src/lib/address.ts";
import type { Logger } from "../../src/lib/log.ts";
import type { AcceptedConn, ConnListener } from "../../src/transport/accept_loop.ts";
import { closeQuietly, writeAll } from "../../src/transport/byte_conn.ts";

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
  const received: Uint8Array[] = [];
  let total = 0;
  let reset = false;
  let runaway = false;
  // Never rejects, so it needs no handler while the sending goes on.
  const reading = (async () => {
    if (ending === "abort") return;
    const buffer = new Uint8Array(256 * 1024);
    for (;;) {
      let n: number | null;
      try {
        n = await conn.read(buffer);
      } catch {
        reset = true; // the server closed with our bytes unread: see SessionOutcome.reset
        return;
      }
      if (n === null) return;
      received.push(buffer.slice(0, n));
      total += n;
      if (total > OUTPUT_BYTES_MAX) {
        runaway = true;
        return;
      }
    }
  })();
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
  if (runaway) throw new Error(`the server sent more than ${OUTPUT_BYTES_MAX} bytes`);
  const output = new Uint8Array(total);
  let offset = 0;
  for (const part of received) {
    output.set(part, offset);
    offset += part.length;
  }
  return { output, peer, reset };
}

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
