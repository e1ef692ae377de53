/**
 * A TCP proxy on loopback for security tests. It forwards between clients and a
 * target server, and on request tampers with the bytes of one direction at exact
 * stream offsets: flips a bit, duplicates or drops a range, or truncates the
 * stream and closes the connection. It records what each side sent, so a test can
 * check that no plaintext crossed the wire, and replays what a client sent on a new
 * connection straight to the target, so a test can check that the server refuses it.
 *
 * It does not cut, hold or throttle the link: the fault proxy (fault_proxy.ts) does.
 */

import { assert } from "../../src/lib/assert.ts";
import { closeQuietly } from "../../src/transport/byte_conn.ts";
import { concat } from "./bytes.ts";
import { closeWriteQuietly, readQuietly, writeQuietly } from "./quiet_io.ts";

const READ_BYTES_MAX = 64 * 1024;
/** Recorded per direction of one connection, and kept of one replay's reply. */
const RECORD_LIMIT_BYTES = 16 * 1024 * 1024;
const REPLAY_LISTEN_MS = 1000;

export type Direction = "toServer" | "toClient";

/** What to do at a tamper's offset; lengths count bytes of the original stream. */
export type TamperAction =
  /** XORs the byte at the offset with `mask` (0x01 unless given). */
  | { kind: "flip"; mask?: number }
  /** Sends [offset, offset + lengthBytes) again right after it. */
  | { kind: "duplicate"; lengthBytes: number }
  /** Removes [offset, offset + lengthBytes). */
  | { kind: "drop"; lengthBytes: number }
  /** Forwards the bytes before the offset, then closes both sides. */
  | { kind: "truncate" };

export type TamperKind = TamperAction["kind"];

export interface Tamper {
  direction: Direction;
  /**
   * Where the action starts, as an offset in the direction's stream of one
   * connection: every byte its sender sent counts, however the reads split them.
   */
  afterBytes: number;
  action: TamperAction;
  /** "next" (the default): the next connection accepted; "all": every one until disarm(). */
  connections?: "next" | "all";
}

/** What the two sides of one connection sent, as the proxy received it (before tampering). */
export interface Recording {
  toServer: Uint8Array;
  toClient: Uint8Array;
  /** The length of each read of `toServer`, so a replay can send it in the same pieces. */
  toServerChunkBytes: number[];
  /** False when a direction passed the record limit and its later bytes were not kept. */
  complete: boolean;
}

export interface ReplayOptions {
  /** "whole" (the default): one write; "original": one write per recorded read. */
  chunking?: "whole" | "original";
  /** Pause between two writes of the original chunking. */
  paceMs?: number;
  /** After the last write, how long to wait for the server to close (1000 unless given). */
  listenMs?: number;
}

export interface ReplayResult {
  /** What the server sent back. */
  received: Uint8Array;
  /** Bytes the kernel accepted; fewer than recorded when a write failed. */
  sentBytes: number;
  /** How the server ended the connection, or null if it was still open after `listenMs`. */
  serverEnded: "fin" | "reset" | null;
  /** When it ended, counted from the connect. */
  serverEndedAfterMs: number | null;
}

export interface TamperProxyStats {
  /** Every connection the listener accepted. */
  accepted: number;
  /** Connections forwarded now. */
  connections: number;
  /** Tamper actions that really changed a stream, by kind. */
  applied: Record<TamperKind, number>;
}

export interface TamperProxyOptions {
  /** Keep what both sides of every connection send, for recordings() (false unless given). */
  record?: boolean;
  /** Kept per direction of one connection. */
  recordLimitBytes?: number;
  /** The largest read, so tests can force reads to split a stream (64 KiB unless given). */
  readBytesMax?: number;
}

/**
 * The tampers of one direction of one connection, applied to its stream read by read.
 * Offsets are those of the original stream, so the actions do not shift each other;
 * a flip goes first, so a duplicate of a flipped byte repeats the flip.
 */
export class StreamTamper {
  /** Bytes of the original stream seen so far. */
  private offsetBytes = 0;
  private readonly truncateAtBytes: number | null;
  private readonly rules: { tamper: Tamper; applied: boolean; copy: Uint8Array | null }[];

  constructor(
    tampers: readonly Tamper[],
    private readonly onApplied: (kind: TamperKind) => void = () => {},
  ) {
    this.rules = tampers.map((tamper) => ({
      tamper,
      applied: false,
      copy: tamper.action.kind === "duplicate" ? new Uint8Array(tamper.action.lengthBytes) : null,
    }));
    const truncates = tampers.filter((tamper) => tamper.action.kind === "truncate");
    this.truncateAtBytes = truncates.length === 0
      ? null
      : Math.min(...truncates.map((tamper) => tamper.afterBytes));
    if (this.truncateAtBytes === 0) this.onApplied("truncate");
  }

  /** True once a truncate's offset is reached: nothing more may be forwarded. */
  get ended(): boolean {
    return this.truncateAtBytes !== null && this.offsetBytes >= this.truncateAtBytes;
  }

  /**
   * What to forward for the next `chunk` of the original stream, in order. A flip
   * changes `chunk` in place; the parts are views of it or of a duplicate's copy.
   */
  rewrite(chunk: Uint8Array): Uint8Array[] {
    assert(!this.ended, "rewrite() after the stream was truncated");
    const start = this.offsetBytes;
    const end = Math.min(start + chunk.length, this.truncateAtBytes ?? Infinity);
    this.offsetBytes = end;
    for (const rule of this.rules) {
      const { afterBytes: at, action } = rule.tamper;
      if (action.kind === "flip" && start <= at && at < end) {
        chunk[at - start]! ^= action.mask ?? 0x01;
        this.apply(rule);
      }
    }
    const bounds = new Set([start, end]);
    for (const rule of this.rules) {
      const { afterBytes: at, action } = rule.tamper;
      if (action.kind === "drop" || action.kind === "duplicate") {
        for (const bound of [at, at + action.lengthBytes]) {
          if (start < bound && bound < end) bounds.add(bound);
        }
      }
      if (rule.copy !== null) {
        const from = Math.max(at, start);
        const to = Math.min(at + rule.copy.length, end);
        if (from < to) rule.copy.set(chunk.subarray(from - start, to - start), from - at);
      }
    }
    const sorted = [...bounds].sort((a, b) => a - b);
    const parts: Uint8Array[] = [];
    for (let i = 0; i + 1 < sorted.length; i++) {
      const from = sorted[i]!;
      const to = sorted[i + 1]!;
      const drop = this.rules.find((rule) =>
        rule.tamper.action.kind === "drop" && rule.tamper.afterBytes <= from &&
        from < rule.tamper.afterBytes + rule.tamper.action.lengthBytes
      );
      if (drop === undefined) parts.push(chunk.subarray(from - start, to - start));
      else this.apply(drop);
      for (const rule of this.rules) {
        if (rule.copy !== null && rule.tamper.afterBytes + rule.copy.length === to) {
          parts.push(rule.copy);
          this.apply(rule);
        }
      }
    }
    if (end === this.truncateAtBytes && end > start) this.onApplied("truncate");
    return parts;
  }

  private apply(rule: { tamper: Tamper; applied: boolean }): void {
    if (rule.applied) return;
    rule.applied = true;
    this.onApplied(rule.tamper.action.kind);
  }
}

/** True when `needle` occurs in `haystack` as consecutive bytes (an empty needle always does). */
export function containsBytes(haystack: Uint8Array, needle: Uint8Array): boolean {
  if (needle.length === 0) return true;
  const first = needle[0]!;
  for (let at = haystack.indexOf(first); at >= 0; at = haystack.indexOf(first, at + 1)) {
    if (at + needle.length > haystack.length) return false;
    if (needle.every((byte, i) => haystack[at + i] === byte)) return true;
  }
  return false;
}

/** What one connection sent each way, kept up to a limit. */
class Recorder {
  readonly chunks: Record<Direction, Uint8Array[]> = { toServer: [], toClient: [] };
  private readonly keptBytes: Record<Direction, number> = { toServer: 0, toClient: 0 };
  private complete = true;

  constructor(private readonly limitBytes: number) {}

  add(direction: Direction, chunk: Uint8Array): void {
    const room = this.limitBytes - this.keptBytes[direction];
    if (chunk.length > room) this.complete = false;
    const kept = chunk.slice(0, Math.min(room, chunk.length));
    if (kept.length === 0) return;
    this.chunks[direction].push(kept);
    this.keptBytes[direction] += kept.length;
  }

  snapshot(): Recording {
    return {
      toServer: concat(...this.chunks.toServer),
      toClient: concat(...this.chunks.toClient),
      toServerChunkBytes: this.chunks.toServer.map((chunk) => chunk.length),
      complete: this.complete,
    };
  }
}

/** A client connection and its own connection to the target. */
class Link {
  constructor(readonly client: Deno.TcpConn, readonly server: Deno.TcpConn) {}

  closeBoth(): void {
    closeQuietly(this.client);
    closeQuietly(this.server);
  }
}

export class TamperProxy {
  private readonly links = new Set<Link>();
  /** Every connection's service still running; close() awaits them all. */
  private readonly tasks = new Set<Promise<unknown>>();
  private readonly recorders: Recorder[] = [];
  private nextTampers: Tamper[] = [];
  private allTampers: Tamper[] = [];
  private acceptedCount = 0;
  private readonly applied: Record<TamperKind, number> = {
    flip: 0,
    duplicate: 0,
    drop: 0,
    truncate: 0,
  };
  private closing: Promise<void> | null = null;

  private constructor(
    private readonly listener: Deno.TcpListener,
    private readonly target: { hostname: string; port: number },
    private readonly options: Required<TamperProxyOptions>,
  ) {
    this.track(this.acceptLoop());
  }

  /** A proxy to `target`, listening on a free port of 127.0.0.1. */
  static start(
    target: { hostname: string; port: number },
    options: TamperProxyOptions = {},
  ): TamperProxy {
    const { record = false, recordLimitBytes = RECORD_LIMIT_BYTES } = options;
    const { readBytesMax = READ_BYTES_MAX } = options;
    if (!(Number.isInteger(recordLimitBytes) && recordLimitBytes >= 0)) {
      throw new RangeError(`recordLimitBytes must be an integer >= 0, got ${recordLimitBytes}`);
    }
    if (!(Number.isInteger(readBytesMax) && readBytesMax >= 1)) {
      throw new RangeError(`readBytesMax must be an integer >= 1, got ${readBytesMax}`);
    }
    const listener = Deno.listen({ hostname: "127.0.0.1", port: 0, transport: "tcp" });
    return new TamperProxy(
      listener,
      { hostname: target.hostname, port: target.port },
      { record, recordLimitBytes, readBytesMax },
    );
  }

  get address(): { hostname: string; port: number } {
    return { hostname: this.listener.addr.hostname, port: this.listener.addr.port };
  }

  /**
   * Arms a tamper for connections accepted from now on: the next one (every tamper
   * armed "next" goes to that same connection) or all of them until disarm().
   */
  tamper(tamper: Tamper): void {
    checkTamper(tamper);
    const copy = { ...tamper, action: { ...tamper.action } };
    if ((tamper.connections ?? "next") === "next") this.nextTampers.push(copy);
    else this.allTampers.push(copy);
  }

  /** Forgets every armed tamper; connections already accepted keep theirs. */
  disarm(): void {
    this.nextTampers = [];
    this.allTampers = [];
  }

  /** What both sides of every connection sent, in accept order (open ones so far). */
  recordings(): Recording[] {
    if (!this.options.record) throw new Error("TamperProxy was started without record: true");
    return this.recorders.map((recorder) => recorder.snapshot());
  }

  stats(): TamperProxyStats {
    return {
      accepted: this.acceptedCount,
      connections: this.links.size,
      applied: { ...this.applied },
    };
  }

  /**
   * Sends a recording's `toServer` bytes on a new connection straight to the target
   * (not through the proxy, untampered and unrecorded), keeps it open without a FIN,
   * and reports what the server sent back and whether it closed.
   */
  async replay(recording: Recording, options: ReplayOptions = {}): Promise<ReplayResult> {
    const { chunking = "whole", paceMs = 0, listenMs = REPLAY_LISTEN_MS } = options;
    const startMs = performance.now();
    const conn = await Deno.connect({ ...this.target, transport: "tcp" });
    const received = new Recorder(this.options.recordLimitBytes);
    let closedByUs = false;
    let serverEnded: "fin" | "reset" | null = null;
    let serverEndedAfterMs: number | null = null;
    const reading = (async () => {
      const buffer = new Uint8Array(READ_BYTES_MAX);
      while (true) {
        const read = await readQuietly(conn, buffer);
        if (typeof read === "number") {
          received.add("toClient", buffer.subarray(0, read));
          continue;
        }
        if (!closedByUs) {
          serverEnded = read === "fin" ? "fin" : "reset";
          serverEndedAfterMs = performance.now() - startMs;
        }
        return;
      }
    })();

    const pieces = chunking === "whole"
      ? [recording.toServer]
      : split(recording.toServer, recording.toServerChunkBytes);
    let sentBytes = 0;
    for (const [i, piece] of pieces.entries()) {
      if (i > 0 && paceMs > 0) await settlesWithin(reading, paceMs);
      if (serverEnded !== null) break;
      const written = await writeQuietly(conn, piece);
      sentBytes += written;
      if (written < piece.length) break;
    }
    await settlesWithin(reading, listenMs);
    closedByUs = true;
    closeQuietly(conn);
    await reading;
    return {
      received: received.snapshot().toClient,
      sentBytes,
      serverEnded,
      serverEndedAfterMs,
    };
  }

  /** Closes the listener and both sides of every connection; safe to call again. */
  close(): Promise<void> {
    return this.closing ??= this.shutdown();
  }

  private async shutdown(): Promise<void> {
    closeQuietly(this.listener);
    for (const link of this.links) link.closeBoth();
    while (this.tasks.size > 0) await Promise.all(this.tasks);
  }

  private track(task: Promise<unknown>): void {
    const settled = task.catch(() => {}).finally(() => this.tasks.delete(settled));
    this.tasks.add(settled);
  }

  private async acceptLoop(): Promise<void> {
    while (true) {
      let client: Deno.TcpConn;
      try {
        client = await this.listener.accept();
      } catch {
        return; // the listener was closed
      }
      this.acceptedCount++;
      const tampers = [...this.nextTampers, ...this.allTampers];
      this.nextTampers = [];
      let recorder: Recorder | null = null;
      if (this.options.record) {
        recorder = new Recorder(this.options.recordLimitBytes);
        this.recorders.push(recorder);
      }
      this.track(this.serve(client, tampers, recorder));
    }
  }

  private async serve(
    client: Deno.TcpConn,
    tampers: Tamper[],
    recorder: Recorder | null,
  ): Promise<void> {
    let server: Deno.TcpConn;
    try {
      server = await Deno.connect({ ...this.target, transport: "tcp" });
    } catch {
      closeQuietly(client);
      return;
    }
    const link = new Link(client, server);
    if (this.closing !== null) return link.closeBoth();
    this.links.add(link);
    const forward = (direction: Direction, from: Deno.TcpConn, to: Deno.TcpConn) => {
      const own = tampers.filter((tamper) => tamper.direction === direction);
      const stream = new StreamTamper(own, (kind) => this.applied[kind]++);
      return this.pump(link, from, to, stream, (chunk) => recorder?.add(direction, chunk));
    };
    await Promise.all([forward("toServer", client, server), forward("toClient", server, client)]);
    link.closeBoth();
    this.links.delete(link);
  }

  /**
   * Forwards one direction until it ends: a FIN is passed on, a failure or a
   * truncate closes both sides. `record` sees each chunk before it is tampered with.
   */
  private async pump(
    link: Link,
    from: Deno.TcpConn,
    to: Deno.TcpConn,
    stream: StreamTamper,
    record: (chunk: Uint8Array) => void,
  ): Promise<void> {
    const buffer = new Uint8Array(this.options.readBytesMax);
    while (!stream.ended) {
      const read = await readQuietly(from, buffer);
      if (read === "fin" && (await closeWriteQuietly(to))) return;
      if (typeof read !== "number") return link.closeBoth();
      const chunk = buffer.subarray(0, read);
      record(chunk);
      for (const part of stream.rewrite(chunk)) {
        if ((await writeQuietly(to, part)) < part.length) return link.closeBoth();
      }
    }
    link.closeBoth();
  }
}

function checkTamper(tamper: Tamper): void {
  const { afterBytes, action } = tamper;
  if (!(Number.isInteger(afterBytes) && afterBytes >= 0)) {
    throw new RangeError(`tamper: afterBytes must be an integer >= 0, got ${afterBytes}`);
  }
  if (action.kind === "flip" && action.mask !== undefined) {
    if (!(Number.isInteger(action.mask) && action.mask >= 1 && action.mask <= 0xff)) {
      throw new RangeError(`tamper: a flip's mask must be an integer 1..255, got ${action.mask}`);
    }
  }
  if (action.kind === "duplicate" || action.kind === "drop") {
    const length = action.lengthBytes;
    if (!(Number.isInteger(length) && length >= 1)) {
      throw new RangeError(
        `tamper: ${action.kind} lengthBytes must be an integer >= 1, got ${length}`,
      );
    }
  }
}

/** `bytes` cut into pieces of the given lengths (the rest, if any, as a last piece). */
function split(bytes: Uint8Array, lengths: readonly number[]): Uint8Array[] {
  const pieces: Uint8Array[] = [];
  let at = 0;
  for (const length of lengths) {
    pieces.push(bytes.subarray(at, at + length));
    at += length;
  }
  if (at < bytes.length) pieces.push(bytes.subarray(at));
  return pieces;
}

/** Waits for `promise` to settle, at most `delayMs`; no timer is left running either way. */
async function settlesWithin(promise: Promise<unknown>, delayMs: number): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<void>((resolve) => {
    timer = setTimeout(resolve, delayMs);
  });
  try {
    await Promise.race([promise.catch(() => {}), timeout]);
  } finally {
    clearTimeout(timer);
  }
}
