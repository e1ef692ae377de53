/**
 * RemoteDevice: a BlockDevice on a DST export. It turns calls into transactions,
 * keeps a bounded window of them in flight on one connection, and hides outages:
 * a lost connection is re-made with backoff and what was in flight is sent again.
 * A caller sees an error only when a transaction used up every resend.
 *
 * Transaction states (a transaction is one request frame and its reply):
 *
 *   submit --> blocked --(earlier overlapping request finished)--+
 *     |                                                          v
 *     +----------------------------------------------------> queued --(window has room,
 *                                                             ^   |     connected)
 *                                  (connection lost: resend) |   v
 *                                                            +-- sent --(reply)--> done
 *   queued or sent --(deadline passed more than `retries` times)--> failed
 *
 * Each deadline that passes counts one attempt. A sent transaction past its deadline
 * means the connection is not working (TCP loses nothing on a live connection), so
 * the connection is dropped and re-made, and everything sent is resent.
 *
 * Invariants (checked by #invariants):
 * 1. Overlapping transactions where either writes are never both queued or sent
 *    (overlap_gate.ts), so a resend never reorders writes.
 * 2. #sent holds exactly the transactions sent on the current link; with no link it is empty.
 * 3. #sentBytes is the payload bytes of #sent; #sent.size <= window.
 * 4. A transaction settles once; after that it is in no queue, map or gate.
 */

import {
  CLIENT_PING_MS_DEFAULT,
  CLIENT_RETRIES_DEFAULT,
  CLIENT_TIMEOUT_MS_DEFAULT,
  CLIENT_WINDOW_BYTES_MAX,
  CLIENT_WINDOW_DEFAULT,
  PAYLOAD_BYTES_MAX,
  RANGE_BYTES_MAX,
  RECEIVE_SLAB_BYTES,
  RECONNECT_DELAY_MS_MAX,
  RECONNECT_DELAY_MS_MIN,
  SEND_COALESCE_BYTES,
  SEND_QUEUE_BYTES_MAX,
  SEND_ZERO_COPY_BYTES_MIN,
} from "../constants.ts";
import {
  type BlockDevice,
  checkRange,
  checkWritable,
  type DeviceInfo,
  type DeviceStats,
  emptyStats,
  type IoFlags,
} from "../device/block_device.ts";
import { formatHostPort, type HostPort } from "../lib/address.ts";
import { assert } from "../lib/assert.ts";
import { type Clock, systemClock } from "../lib/clock.ts";
import { describeError, DeviceError, DstError, ProtocolError } from "../lib/errors.ts";
import { bytesToHex } from "../lib/hex.ts";
import { type Logger, logger } from "../lib/log.ts";
import {
  Command,
  COMMAND_NAMES,
  decodeInfo,
  decodeReplyHeader,
  encodeRequestHeader,
  expectedReplyPayload,
  ExportFlag,
  type ExportInfo,
  ReplyLayout,
  replyPayloadLimit,
  RequestFlag,
  RequestLayout,
  type ServerHello,
  WIRE_ERROR_NAMES,
} from "../protocol/mod.ts";
import { type ByteConn, closeQuietly } from "../transport/byte_conn.ts";
import { FrameSender } from "../transport/frame_sender.ts";
import { ReceiveBuffer } from "../transport/receive_buffer.ts";
import type { Gated } from "./overlap_gate.ts";
import { OverlapGate } from "./overlap_gate.ts";
import { type Dialer, dialExport, tcpDialer } from "./dial.ts";

export interface RemoteDeviceOptions {
  /** Milliseconds one attempt may wait for its reply. */
  timeoutMs?: number;
  /** Resends after the first attempt before the caller sees an error. */
  retries?: number;
  /** Idle milliseconds before a ping checks that the export is still there. */
  pingMs?: number;
  /** Transactions in flight at most (capped by what the export allows). */
  window?: number;
  dial?: Dialer;
  clock?: Clock;
  log?: Logger;
  /**
   * Declares the client a writer: each connection starts a new write generation at
   * the export, reported in its hello. A mirror's legs need that; other clients
   * leave it off, and the export starts a generation on their first write instead.
   */
  writer?: boolean;
}

interface Transaction extends Gated {
  readonly id: number;
  readonly command: number;
  readonly flags: number;
  readonly offset: number;
  readonly length: number;
  /** Write payload (the caller's buffer, untouched until the transaction settles). */
  readonly payload: Uint8Array | null;
  /** Read destination (the caller's buffer). */
  readonly into: Uint8Array | null;
  /** Payload bytes this transaction moves, for the byte window. */
  readonly windowBytes: number;
  result: Uint8Array | null;
  attempts: number;
  deadlineMs: number;
  settled: boolean;
  resolve(result: Uint8Array | null): void;
  reject(error: Error): void;
}

interface ActiveLink {
  conn: ByteConn;
  sender: FrameSender;
  receive: ReceiveBuffer;
}

const NO_RANGE = { start: 0, end: 0 };

export class RemoteDevice implements BlockDevice {
  readonly info: DeviceInfo;
  readonly address: HostPort;
  readonly timeoutMs: number;
  readonly retries: number;
  readonly pingMs: number;
  readonly #window: number;
  readonly #payloadBytesMax: number;
  readonly #exportId: string;
  readonly #dial: Dialer;
  readonly #clock: Clock;
  readonly #log: Logger;
  readonly #where: string;
  readonly #writer: boolean;
  #onReconnect: ((writeGeneration: number) => void) | null = null;
  #writeGeneration: number;

  readonly #gate = new OverlapGate();
  readonly #sent = new Map<number, Transaction>();
  #queue: Transaction[] = [];
  #sentBytes = 0;
  #link: ActiveLink | null = null;
  #reconnecting = false;
  #nextId = 1;
  #lastActivityMs: number;
  #pinging = false;
  #closing = false;
  #fatal: Error | null = null;
  #settledWaiters: Array<() => void> = [];
  readonly #ticker: ReturnType<typeof setInterval>;
  readonly #requestHeader = new Uint8Array(RequestLayout.SIZE);
  readonly #requestView = new DataView(this.#requestHeader.buffer);
  readonly #stats = emptyStats();
  #reconnects = 0;
  #resends = 0;

  private constructor(
    address: HostPort,
    hello: ServerHello,
    conn: ByteConn,
    options: RemoteDeviceOptions,
  ) {
    this.address = address;
    this.#where = formatHostPort(address);
    this.timeoutMs = options.timeoutMs ?? CLIENT_TIMEOUT_MS_DEFAULT;
    this.retries = options.retries ?? CLIENT_RETRIES_DEFAULT;
    this.pingMs = options.pingMs ?? CLIENT_PING_MS_DEFAULT;
    this.#window = Math.min(options.window ?? CLIENT_WINDOW_DEFAULT, hello.inFlightMax);
    this.#payloadBytesMax = Math.min(hello.payloadBytesMax, PAYLOAD_BYTES_MAX);
    this.#exportId = bytesToHex(hello.exportId);
    this.#dial = options.dial ?? tcpDialer;
    this.#writer = options.writer ?? false;
    this.#writeGeneration = hello.writeGeneration;
    this.#clock = options.clock ?? systemClock;
    this.#log = options.log ?? logger("client");
    this.info = {
      sizeBytes: hello.sizeBytes,
      blockSize: hello.blockSize,
      readOnly: (hello.exportFlags & ExportFlag.READ_ONLY) !== 0,
      id: this.#exportId,
      name: this.#where,
    };
    this.#lastActivityMs = this.#clock.nowMs();
    const tickMs = Math.max(
      20,
      Math.min(250, Math.floor(this.timeoutMs / 4), Math.floor(this.pingMs / 2)),
    );
    this.#ticker = setInterval(() => this.#tick(), tickMs);
    this.#attach(conn);
  }

  /** Connects to an export; a first connection that fails is an error at once, with the reason. */
  static async connect(
    address: HostPort,
    options: RemoteDeviceOptions = {},
  ): Promise<RemoteDevice> {
    const { conn, hello } = await dialExport(address, options.dial, options.writer);
    return new RemoteDevice(address, hello, conn, options);
  }

  get connected(): boolean {
    return this.#link !== null;
  }

  /** Called on every reconnect, before anything is resent, with the export's write generation. */
  setReconnectListener(listener: (writeGeneration: number) => void): void {
    this.#onReconnect = listener;
  }

  /** It gave up for good (the export changed identity): every call fails; make a new one. */
  get gaveUp(): boolean {
    return this.#fatal !== null;
  }

  /** The export's write generation as of the latest (re)connect. */
  get writeGeneration(): number {
    return this.#writeGeneration;
  }

  read(offset: number, into: Uint8Array): Promise<void> {
    try {
      checkRange(this.info, "read", offset, into.length);
    } catch (error) {
      return Promise.reject(error);
    }
    return this.#chunked(
      offset,
      into.length,
      this.#payloadBytesMax,
      (at, length) =>
        this.#submit(
          Command.READ,
          0,
          at,
          length,
          null,
          into.subarray(at - offset, at - offset + length),
        ),
    );
  }

  write(offset: number, data: Uint8Array, flags?: IoFlags): Promise<void> {
    try {
      checkWritable(this.info, "write");
      checkRange(this.info, "write", offset, data.length);
    } catch (error) {
      return Promise.reject(error);
    }
    const wireFlags = toWireFlags(flags);
    return this.#chunked(
      offset,
      data.length,
      this.#payloadBytesMax,
      (at, length) =>
        this.#submit(
          Command.WRITE,
          wireFlags,
          at,
          length,
          data.subarray(at - offset, at - offset + length),
          null,
        ),
    );
  }

  async flush(): Promise<void> {
    await this.#submit(Command.FLUSH, 0, 0, 0, null, null);
  }

  discard(offset: number, length: number, flags?: IoFlags): Promise<void> {
    return this.#ranged(Command.DISCARD, "discard", offset, length, flags);
  }

  writeZeroes(offset: number, length: number, flags?: IoFlags): Promise<void> {
    return this.#ranged(Command.WRITE_ZEROES, "write zeroes to", offset, length, flags);
  }

  /** Asks the export for its geometry now (it may differ from the handshake's after a resize). */
  async queryInfo(): Promise<ExportInfo> {
    const payload = await this.#submit(Command.INFO, 0, 0, 0, null, null);
    const info = decodeInfo(payload!);
    if (typeof info === "string") throw new ProtocolError(`${this.#where}: ${info}`);
    return info;
  }

  /** The export's STATUS document. */
  queryStatus(): Promise<unknown> {
    return this.#jsonCall(Command.STATUS, null);
  }

  /** Sends a CONTROL request (an array's detach or attach) and returns the JSON answer. */
  control(request: unknown): Promise<unknown> {
    return this.#jsonCall(Command.CONTROL, new TextEncoder().encode(JSON.stringify(request)));
  }

  /** A command whose reply is a JSON document (STATUS, CONTROL). */
  async #jsonCall(command: Command, body: Uint8Array | null): Promise<unknown> {
    const payload = await this.#submit(command, 0, 0, 0, body, null);
    try {
      return JSON.parse(new TextDecoder().decode(payload!));
    } catch {
      throw new ProtocolError(`${this.#where}: ${COMMAND_NAMES[command]} reply is not JSON`);
    }
  }

  async ping(): Promise<void> {
    await this.#submit(Command.PING, 0, 0, 0, null, null);
  }

  stats(): DeviceStats {
    return { ...this.#stats };
  }

  /** Counters of the transport itself, for status and tests. */
  transportStats(): {
    inFlight: number;
    queued: number;
    reconnects: number;
    resends: number;
    connected: boolean;
  } {
    return {
      inFlight: this.#sent.size,
      queued: this.#queue.length,
      reconnects: this.#reconnects,
      resends: this.#resends,
      connected: this.#link !== null,
    };
  }

  /** Waits for every transaction to settle (each is bounded by its deadline), then disconnects. */
  async close(): Promise<void> {
    this.#closing = true;
    while (this.#gate.size > 0 || this.#queue.length > 0 || this.#sent.size > 0) {
      await new Promise<void>((resolve) => this.#settledWaiters.push(resolve));
    }
    clearInterval(this.#ticker);
    const link = this.#link;
    this.#link = null;
    if (link !== null) {
      link.sender.abort(new Error("closed"));
      closeQuietly(link.conn);
    }
  }

  // --- submission -----------------------------------------------------------------

  #ranged(
    command: number,
    what: string,
    offset: number,
    length: number,
    flags?: IoFlags,
  ): Promise<void> {
    try {
      checkWritable(this.info, what);
      checkRange(this.info, what, offset, length);
    } catch (error) {
      return Promise.reject(error);
    }
    const wireFlags = toWireFlags(flags);
    return this.#chunked(
      offset,
      length,
      RANGE_BYTES_MAX,
      (at, chunk) => this.#submit(command, wireFlags, at, chunk, null, null),
    );
  }

  /** Splits [offset, offset + length) into frames of at most `chunkMax` bytes, all in flight at once. */
  async #chunked(
    offset: number,
    length: number,
    chunkMax: number,
    submit: (at: number, length: number) => Promise<unknown>,
  ): Promise<void> {
    if (length === 0) return;
    if (length <= chunkMax) {
      await submit(offset, length);
      return;
    }
    const parts: Promise<unknown>[] = [];
    for (let at = offset; at < offset + length; at += chunkMax) {
      parts.push(submit(at, Math.min(chunkMax, offset + length - at)));
    }
    await Promise.all(parts);
  }

  #submit(
    command: number,
    flags: number,
    offset: number,
    length: number,
    payload: Uint8Array | null,
    into: Uint8Array | null,
  ): Promise<Uint8Array | null> {
    if (this.#fatal !== null) return Promise.reject(this.#fatal);
    const ranged = length > 0;
    const range = ranged ? { start: offset, end: offset + length } : NO_RANGE;
    return new Promise((resolve, reject) => {
      const tx: Transaction = {
        id: this.#nextId++,
        command,
        flags,
        offset,
        length,
        payload,
        into,
        windowBytes: command === Command.READ || command === Command.WRITE ? length : 0,
        start: range.start,
        end: range.end,
        writes: command !== Command.READ,
        blockers: 0,
        dependents: null,
        result: null,
        attempts: 0,
        deadlineMs: 0,
        settled: false,
        resolve,
        reject,
      };
      if (!ranged || this.#gate.enter(tx)) this.#enqueue(tx);
    });
  }

  #enqueue(tx: Transaction): void {
    tx.deadlineMs = this.#clock.nowMs() + this.timeoutMs;
    this.#queue.push(tx);
    this.#pump();
  }

  /** Sends queued transactions while the window has room. */
  #pump(): void {
    const link = this.#link;
    if (link === null) return;
    let sentNow = 0;
    while (this.#queue.length > sentNow && this.#sent.size < this.#window) {
      const tx = this.#queue[sentNow]!;
      if (this.#sent.size > 0 && this.#sentBytes + tx.windowBytes > CLIENT_WINDOW_BYTES_MAX) break;
      sentNow += 1;
      this.#send(link, tx);
    }
    if (sentNow > 0) this.#queue.splice(0, sentNow);
  }

  #send(link: ActiveLink, tx: Transaction): void {
    encodeRequestHeader(this.#requestView, 0, {
      command: tx.command,
      flags: tx.flags,
      txId: tx.id,
      offset: tx.length > 0 ? tx.offset : 0,
      length: tx.length,
      payloadLength: tx.payload?.length ?? 0,
    });
    tx.deadlineMs = this.#clock.nowMs() + this.timeoutMs;
    this.#sent.set(tx.id, tx);
    this.#sentBytes += tx.windowBytes;
    link.sender.send(this.#requestHeader, tx.payload ?? undefined);
  }

  // --- replies --------------------------------------------------------------------

  #attach(conn: ByteConn): void {
    assert(this.#link === null, "one link at a time");
    const link: ActiveLink = {
      conn,
      sender: new FrameSender(conn, {
        coalesceBytes: SEND_COALESCE_BYTES,
        zeroCopyBytesMin: SEND_ZERO_COPY_BYTES_MIN,
        queueBytesMax: SEND_QUEUE_BYTES_MAX,
      }),
      receive: new ReceiveBuffer(RECEIVE_SLAB_BYTES, ReplyLayout.SIZE + PAYLOAD_BYTES_MAX),
    };
    this.#link = link;
    this.#lastActivityMs = this.#clock.nowMs();
    void link.sender.closed.then((reason) => this.#linkLost(link, reason));
    void this.#readReplies(link);
    this.#pump();
    this.#invariants();
  }

  async #readReplies(link: ActiveLink): Promise<void> {
    const receive = link.receive;
    try {
      for (;;) {
        if (!(await receive.fill(link.conn, ReplyLayout.SIZE))) {
          throw new DstError("CONNECTION_CLOSED", "the export closed the connection");
        }
        while (receive.available >= ReplyLayout.SIZE) {
          const header = decodeReplyHeader(receive.view, receive.position);
          if (typeof header === "string") throw new ProtocolError(header);
          const tx = this.#sent.get(header.txId);
          if (tx === undefined) {
            throw new ProtocolError(`reply to unknown transaction ${header.txId}`);
          }
          if (header.command !== tx.command) {
            throw new ProtocolError(`reply to transaction ${tx.id} is for the wrong command`);
          }
          const expected = expectedReplyPayload(tx.command, tx.length);
          const fits = header.error !== 0 ||
            (expected >= 0
              ? header.payloadLength === expected
              : header.payloadLength <= replyPayloadLimit(tx.command, tx.length));
          if (!fits) {
            throw new ProtocolError(
              `reply to transaction ${tx.id} has ${header.payloadLength} bytes`,
            );
          }
          receive.skip(ReplyLayout.SIZE);
          if (header.payloadLength > 0) {
            if (tx.into !== null) {
              if (!(await receive.readInto(link.conn, tx.into))) {
                throw new DstError(
                  "CONNECTION_CLOSED",
                  "the export closed the connection mid-reply",
                );
              }
            } else {
              if (!(await receive.fill(link.conn, header.payloadLength))) {
                throw new DstError(
                  "CONNECTION_CLOSED",
                  "the export closed the connection mid-reply",
                );
              }
              tx.result = receive.take(header.payloadLength).slice();
            }
          }
          if (this.#link !== link) return; // dropped while reading the payload
          this.#sent.delete(tx.id);
          this.#sentBytes -= tx.windowBytes;
          this.#settle(tx, header.error);
        }
        this.#lastActivityMs = this.#clock.nowMs();
        this.#pump();
      }
    } catch (error) {
      this.#linkLost(link, error);
    }
  }

  #settle(tx: Transaction, error: number): void {
    assert(!tx.settled, "Invariant 4: a transaction settles once");
    tx.settled = true;
    if (tx.length > 0) this.#gate.finish(tx, (next) => this.#enqueue(next as Transaction));
    if (error === 0) {
      this.#count(tx);
      tx.resolve(tx.result);
    } else {
      this.#stats.errors += 1;
      tx.reject(this.#wireError(tx, error));
    }
    if (this.#settledWaiters.length > 0) {
      const waiters = this.#settledWaiters;
      this.#settledWaiters = [];
      for (const wake of waiters) wake();
    }
  }

  #fail(tx: Transaction, error: Error): void {
    assert(!tx.settled, "Invariant 4: a transaction settles once");
    tx.settled = true;
    this.#stats.errors += 1;
    if (tx.length > 0) this.#gate.finish(tx, (next) => this.#enqueue(next as Transaction));
    tx.reject(error);
    const waiters = this.#settledWaiters;
    this.#settledWaiters = [];
    for (const wake of waiters) wake();
  }

  #count(tx: Transaction): void {
    const s = this.#stats;
    switch (tx.command) {
      case Command.READ:
        s.reads += 1;
        s.readBytes += tx.length;
        break;
      case Command.WRITE:
        s.writes += 1;
        s.writtenBytes += tx.length;
        break;
      case Command.FLUSH:
        s.flushes += 1;
        break;
      case Command.DISCARD:
        s.discards += 1;
        break;
      case Command.WRITE_ZEROES:
        s.zeroes += 1;
        break;
    }
  }

  #wireError(tx: Transaction, code: number): DeviceError {
    const errno = WIRE_ERROR_NAMES[code] ?? "EIO";
    const what = COMMAND_NAMES[tx.command]!.toLowerCase().replace("_", " ");
    const range = tx.length > 0 ? ` of ${tx.length} bytes at offset ${tx.offset}` : "";
    return new DeviceError(errno, `${this.#where} refused ${what}${range}: ${errno}`);
  }

  // --- outages --------------------------------------------------------------------

  /** The link broke: everything sent goes back to the front of the queue, and reconnecting starts. */
  #linkLost(link: ActiveLink, reason: unknown): void {
    if (this.#link !== link) return;
    this.#link = null;
    link.sender.abort(reason);
    closeQuietly(link.conn);
    const resend = [...this.#sent.values()].sort((a, b) => a.id - b.id);
    this.#sent.clear();
    this.#sentBytes = 0;
    this.#queue = resend.concat(this.#queue);
    this.#resends += resend.length;
    this.#invariants();
    if (this.#closing && this.#queue.length === 0) return;
    this.#log.warn(
      `lost ${this.#where}: ${describeError(reason)}; reconnecting` +
        (resend.length > 0 ? `, ${resend.length} in flight will be resent` : ""),
    );
    void this.#reconnect();
  }

  async #reconnect(): Promise<void> {
    if (this.#reconnecting) return;
    this.#reconnecting = true;
    let delayMs = RECONNECT_DELAY_MS_MIN;
    try {
      while (this.#link === null && this.#fatal === null) {
        if (this.#closing && this.#queue.length === 0) return;
        await new Promise((resolve) => setTimeout(resolve, delayMs * (0.5 + Math.random())));
        delayMs = Math.min(delayMs * 2, RECONNECT_DELAY_MS_MAX);
        let conn: ByteConn;
        let hello: ServerHello;
        try {
          ({ conn, hello } = await dialExport(this.address, this.#dial, this.#writer));
        } catch (error) {
          this.#log.debug(`reconnect to ${this.#where} failed: ${describeError(error)}`);
          continue;
        }
        const changed = this.#identityChange(hello);
        if (changed !== null) {
          closeQuietly(conn);
          this.#giveUp(
            new DeviceError("ESTALE", `${this.#where} ${changed}; refusing to write to it`),
          );
          return;
        }
        this.#reconnects += 1;
        this.#writeGeneration = hello.writeGeneration;
        this.#onReconnect?.(hello.writeGeneration);
        this.#log.info(
          `reconnected to ${this.#where}; resending ${this.#queue.length} transactions`,
        );
        this.#attach(conn);
      }
    } finally {
      this.#reconnecting = false;
    }
  }

  #identityChange(hello: ServerHello): string | null {
    const id = bytesToHex(hello.exportId);
    if (id !== this.#exportId) return `is now a different export (id ${id}, was ${this.#exportId})`;
    if (hello.sizeBytes !== this.info.sizeBytes) {
      return `changed size from ${this.info.sizeBytes} to ${hello.sizeBytes} bytes`;
    }
    return null;
  }

  /** A fatal condition: every transaction fails now, and so does every later one. */
  #giveUp(error: Error): void {
    this.#fatal = error;
    this.#log.error(error.message);
    const failing = [...this.#sent.values(), ...this.#queue];
    this.#sent.clear();
    this.#sentBytes = 0;
    this.#queue = [];
    for (const tx of failing) this.#fail(tx, error);
  }

  /** Deadlines and idle pings, a few times per timeout. */
  #tick(): void {
    const now = this.#clock.nowMs();
    const link = this.#link;
    if (link !== null) {
      for (const tx of this.#sent.values()) {
        if (tx.deadlineMs <= now) {
          this.#linkLost(link, new Error(`no reply within ${this.timeoutMs} ms`));
          break;
        }
      }
    }
    if (this.#queue.some((tx) => tx.deadlineMs <= now)) {
      const keep: Transaction[] = [];
      for (const tx of this.#queue) {
        if (tx.deadlineMs > now) {
          keep.push(tx);
          continue;
        }
        tx.attempts += 1;
        if (tx.attempts > this.retries) {
          this.#fail(
            tx,
            new DeviceError(
              "ETIMEDOUT",
              `No reply from ${this.#where} to ${
                COMMAND_NAMES[tx.command]
              } after ${tx.attempts} attempts ` +
                `of ${this.timeoutMs} ms; the export is down or unreachable`,
            ),
          );
        } else {
          tx.deadlineMs = now + this.timeoutMs;
          keep.push(tx);
        }
      }
      this.#queue = keep;
    }
    const idle = this.#sent.size === 0 && this.#queue.length === 0;
    if (
      this.#link !== null && idle && !this.#pinging && now - this.#lastActivityMs >= this.pingMs
    ) {
      this.#pinging = true;
      this.ping().catch((error) =>
        this.#log.debug(`ping of ${this.#where}: ${describeError(error)}`)
      )
        .finally(() => (this.#pinging = false));
    }
  }

  #invariants(): void {
    assert(
      this.#link !== null || this.#sent.size === 0,
      "Invariant 2: nothing sent without a link",
    );
    assert(this.#sent.size <= this.#window, "Invariant 3: the window holds");
    assert(this.#sentBytes >= 0, "Invariant 3: sent bytes are counted");
  }
}

function toWireFlags(flags: IoFlags | undefined): number {
  if (flags === undefined) return 0;
  return (flags.fua ? RequestFlag.FUA : 0) | (flags.preflush ? RequestFlag.PREFLUSH : 0);
}
