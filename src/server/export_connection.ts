/**
 * One client connection of an export, after the handshake: DST request frames are
 * validated and run against the device (the read loop, limits and backpressure are
 * RequestLoop's). A request that is well framed but invalid gets an error reply (its
 * payload was already read, so the stream stays framed); a frame that cannot be
 * trusted closes the connection with one log line. The export itself goes on.
 */

import {
  CONNECTION_IDLE_MS,
  IN_FLIGHT_BYTES_PER_CONNECTION_MAX,
  IN_FLIGHT_PER_CONNECTION_MAX,
  PAYLOAD_BYTES_MAX,
  SEND_QUEUE_BYTES_MAX,
  STATUS_PAYLOAD_BYTES_MAX,
} from "../constants.ts";
import { describeError } from "../lib/errors.ts";
import type { BlockDevice, IoFlags } from "../device/block_device.ts";
import type { BufferPool } from "../lib/buffer_pool.ts";
import type { Logger } from "../lib/log.ts";
import type { Clock } from "../lib/clock.ts";
import {
  Command,
  COMMAND_NAMES,
  decodeRequestHeader,
  encodeInfo,
  encodeReplyHeader,
  ExportFlag,
  ReplyLayout,
  RequestFlag,
  type RequestHeader,
  RequestLayout,
  type RequestRejection,
  validateRequest,
  WireError,
} from "../protocol/mod.ts";
import type { ByteConn } from "../transport/byte_conn.ts";
import type { Slab } from "../transport/receive_buffer.ts";
import { CLOSE, RequestLoop } from "../transport/request_loop.ts";
import { FirstWriteGate } from "./first_write_gate.ts";
import type { WriteGrant } from "./writer_lease.ts";
import type { Access } from "../lib/allow_rules.ts";
import type { MemoryBudget } from "../transport/memory_budget.ts";

/** The device operations whose time is measured, as the metrics name them (`op` label). */
export type TimedOp = "read" | "write" | "flush" | "discard" | "write_zeroes";

/** Told how long each device request took, from dispatch to its reply queued (--metrics). */
export interface RequestTiming {
  observe(op: TimedOp, seconds: number): void;
}

/** What a connection needs from its export. */
export interface ExportContext {
  readonly device: BlockDevice;
  readonly pool: BufferPool;
  readonly log: Logger;
  /** The export's clock: how long the connection has been silent is measured on it. */
  readonly clock: Clock;
  /** How long the connection may sit idle before it is closed (default CONNECTION_IDLE_MS). */
  readonly idleMs?: number;
  /** The STATUS reply, built when asked. */
  statusJson(): Uint8Array;
  /** Counts a request the export refused or a frame that broke the protocol. */
  countError(): void;
  /**
   * Asks for a write grant (the writer lease and a new write generation) before this
   * connection's first write; null when it cannot write.
   */
  readonly acquire: (() => Promise<WriteGrant>) | null;
  /** The grant its handshake obtained (the client declared WRITER), or null. */
  readonly grant: WriteGrant | null;
  /** The connection has ended: nothing of it is in flight any more. */
  ended(connection: ExportConnection): void;
  /** Runs a CONTROL request (JSON in, JSON out); null: the export has no owner to ask. */
  readonly control: ((request: unknown) => Promise<unknown>) | null;
  /** This client's access (--allow): `ro` may not write, only `admin` may send CONTROL. */
  readonly access: Access;
  /** The export's payload memory, shared by its connections (--memory). */
  readonly budget?: MemoryBudget;
  /** Where request times go; absent, the clock is not even read. */
  readonly timing?: RequestTiming;
}

export class ExportConnection extends RequestLoop {
  readonly #replyHeader = new Uint8Array(ReplyLayout.SIZE);
  readonly #replyView = new DataView(this.#replyHeader.buffer);
  readonly #writes: FirstWriteGate;
  /** READs waiting for the export's memory budget (#parkRead), oldest first. */
  readonly #parked: RequestHeader[] = [];

  constructor(conn: ByteConn, peer: string, readonly ctx: ExportContext) {
    super(conn, peer, ctx.log, {
      inFlightMax: IN_FLIGHT_PER_CONNECTION_MAX,
      inFlightBytesMax: IN_FLIGHT_BYTES_PER_CONNECTION_MAX,
      sendQueueBytesMax: SEND_QUEUE_BYTES_MAX,
      frameBytesMax: RequestLayout.SIZE + PAYLOAD_BYTES_MAX,
      headerBytes: RequestLayout.SIZE,
      idleMs: ctx.idleMs ?? CONNECTION_IDLE_MS,
      budget: ctx.budget ?? null,
    }, ctx.clock);
    this.#writes = new FirstWriteGate(ctx.acquire, ctx.grant);
  }

  /** True while this connection may write because it holds a grant of the writer lease. */
  get holdsGrant(): boolean {
    return this.#writes.holdsGrant;
  }

  protected override get answersStatusQueries(): boolean {
    return true;
  }

  protected override ended(): void {
    this.#writes.release();
    this.ctx.ended(this);
  }

  protected dispatchArrived(): number {
    const receive = this.receive;
    while (receive.available >= RequestLayout.SIZE && !this.saturated()) {
      const header = decodeRequestHeader(receive.view, receive.position);
      if (typeof header === "string") {
        this.ctx.countError();
        this.ctx.log.warn(`${this.peer}: ${header}; closing this connection`);
        return CLOSE;
      }
      // Before its payload is read: a WRITE may wait here for memory (a PING never does).
      if (this.mustWaitForMemory(header.payloadLength)) return RequestLayout.SIZE;
      const frameBytes = RequestLayout.SIZE + header.payloadLength;
      if (receive.available < frameBytes) return frameBytes;
      receive.skip(RequestLayout.SIZE);
      const rejection = validateRequest(header) ?? this.#checkAgainstExport(header);
      if (rejection !== null) {
        receive.skip(header.payloadLength); // drained: the stream stays framed
        this.#reject(header, rejection);
        continue;
      }
      if (!this.#parkRead(header)) this.#execute(header);
    }
    return RequestLayout.SIZE;
  }

  /**
   * A READ while the export's memory budget is spent waits here, parked, and the
   * connection reads on: its pings, status queries and flushes are still answered, so
   * the client does not take the wait for a dead export. Parked READs count against
   * the requests in flight, and go out in order as memory is released. Returns whether
   * `h` was parked.
   */
  #parkRead(h: RequestHeader): boolean {
    const budget = this.limits.budget;
    if (h.command !== Command.READ || budget === undefined || budget === null) return false;
    if (this.#parked.length === 0 && !budget.spent) return false;
    this.#parked.push(h);
    if (this.#parked.length === 1) void budget.whenReleased().then(() => this.#unpark());
    return true;
  }

  #unpark(): void {
    const budget = this.limits.budget!;
    if (this.stopping) {
      this.#parked.length = 0; // never dispatched: dropped with the connection, as fencing drops frames
      return;
    }
    while (this.#parked.length > 0 && !budget.spent) this.#execute(this.#parked.shift()!);
    if (this.#parked.length > 0) void budget.whenReleased().then(() => this.#unpark());
  }

  protected override saturated(): boolean {
    return super.saturated() ||
      this.inFlight + this.#parked.length >= IN_FLIGHT_PER_CONNECTION_MAX;
  }

  #checkAgainstExport(h: RequestHeader): RequestRejection | null {
    const info = this.ctx.device.info;
    const name = COMMAND_NAMES[h.command]!;
    const ranged = h.command === Command.READ || h.command === Command.WRITE ||
      h.command === Command.DISCARD || h.command === Command.WRITE_ZEROES;
    const writes = h.command === Command.WRITE || h.command === Command.DISCARD ||
      h.command === Command.WRITE_ZEROES;
    if (writes && info.readOnly) {
      return { error: WireError.EPERM, reason: `${name}: the export is read-only` };
    }
    if (writes && this.ctx.access === "ro") {
      return { error: WireError.EPERM, reason: `${name}: this client may only read (--allow)` };
    }
    if (h.command === Command.CONTROL && this.ctx.access !== "admin") {
      return {
        error: WireError.EPERM,
        reason: "CONTROL needs admin access (from loopback, or an --allow rule with =admin)",
      };
    }
    if (ranged && h.offset + h.length > info.sizeBytes) {
      return {
        error: h.command === Command.READ ? WireError.EINVAL : WireError.ENOSPC,
        reason:
          `${name} of ${h.length} bytes at offset ${h.offset}: export size is ${info.sizeBytes}`,
      };
    }
    return null;
  }

  #reject(h: RequestHeader, rejection: RequestRejection): void {
    this.ctx.countError();
    this.logRejection(`refused request ${h.txId}: ${rejection.reason}`);
    this.begin(payloadBytes(h));
    this.#reply(h, rejection.error);
  }

  #execute(h: RequestHeader): void {
    const device = this.ctx.device;
    const flags: IoFlags = {
      fua: (h.flags & RequestFlag.FUA) !== 0,
      preflush: (h.flags & RequestFlag.PREFLUSH) !== 0,
    };
    this.begin(payloadBytes(h));
    this.noteRequest(h.command === Command.STATUS);
    // One clock read here and one at the reply, only when someone asked for the times.
    const startMs = this.ctx.timing === undefined ? 0 : this.ctx.clock.nowMs();
    switch (h.command) {
      case Command.READ: {
        // Room for the reply header in front of the data: header and data leave in one write.
        const buffer = this.ctx.pool.take(ReplyLayout.SIZE + h.length);
        this.complete(
          device.read(h.offset, buffer.subarray(ReplyLayout.SIZE)),
          "READ",
          () => {
            this.#timed("read", startMs);
            this.#replyRead(h, buffer);
          },
          (errno) => {
            this.#timed("read", startMs);
            this.ctx.pool.give(buffer);
            this.#reply(h, errno);
          },
        );
        return;
      }
      case Command.WRITE: {
        const slab = this.receive.lease();
        const data = this.receive.take(h.payloadLength);
        const done = this.#writes.run(() => device.write(h.offset, data, flags));
        this.#settle(h, done, "write", startMs, slab);
        return;
      }
      case Command.FLUSH:
        this.#settle(h, device.flush(), "flush", startMs);
        return;
      case Command.DISCARD: {
        const done = this.#writes.run(() => device.discard(h.offset, h.length, flags));
        this.#settle(h, done, "discard", startMs);
        return;
      }
      case Command.WRITE_ZEROES: {
        const done = this.#writes.run(() => device.writeZeroes(h.offset, h.length, flags));
        this.#settle(h, done, "write_zeroes", startMs);
        return;
      }
      case Command.INFO: {
        const info = device.info;
        const payload = encodeInfo({
          sizeBytes: info.sizeBytes,
          blockSize: info.blockSize,
          exportFlags: info.readOnly ? ExportFlag.READ_ONLY : 0,
        });
        this.#reply(h, WireError.OK, payload);
        return;
      }
      case Command.PING:
        this.#reply(h, WireError.OK);
        return;
      case Command.STATUS:
        this.#reply(h, WireError.OK, this.ctx.statusJson());
        return;
      case Command.CONTROL:
        this.#control(h, this.receive.take(h.payloadLength).slice());
        return;
    }
  }

  /** CONTROL: JSON in, JSON out; what went wrong is said in the reply's `error`, not an errno. */
  #control(h: RequestHeader, payload: Uint8Array): void {
    const control = this.ctx.control;
    if (control === null) {
      this.#reply(h, WireError.ENOTSUP);
      return;
    }
    let request: unknown;
    try {
      request = JSON.parse(new TextDecoder().decode(payload));
    } catch {
      this.#reply(h, WireError.EINVAL);
      return;
    }
    control(request).then(
      (answer) => answer,
      (error) => ({ ok: false, error: describeError(error) }),
    ).then((answer) => {
      let bytes = new TextEncoder().encode(JSON.stringify(answer));
      if (bytes.length > STATUS_PAYLOAD_BYTES_MAX) {
        bytes = new TextEncoder().encode(JSON.stringify({ ok: false, error: "answer too large" }));
      }
      this.#reply(h, WireError.OK, bytes);
    });
  }

  /**
   * A device call whose reply carries no payload, timed as `op` from `startMs`; `leased`
   * holds a WRITE's payload until it ends.
   */
  #settle(
    h: RequestHeader,
    done: Promise<void>,
    op: TimedOp,
    startMs: number,
    leased: Slab | null = null,
  ): void {
    const what = COMMAND_NAMES[h.command]!;
    this.complete(
      done,
      what,
      () => {
        this.#timed(op, startMs);
        this.#reply(h, WireError.OK);
      },
      (errno) => {
        this.#timed(op, startMs);
        this.#reply(h, errno);
      },
      leased,
    );
  }

  /** A device request ended: how long it took goes to the metrics, when there are any. */
  #timed(op: TimedOp, startMs: number): void {
    const timing = this.ctx.timing;
    if (timing !== undefined) timing.observe(op, (this.ctx.clock.nowMs() - startMs) / 1000);
  }

  #reply(h: RequestHeader, error: number, payload?: Uint8Array): void {
    this.#encodeReply(h, error, payload?.length ?? 0);
    this.sender.send(this.#replyHeader, payload);
    this.end(payloadBytes(h));
  }

  /**
   * `buffer` holds the data after ReplyLayout.SIZE bytes. The reply header is encoded as
   * any other, then copied in front of the data, so header and data leave in one write.
   */
  #replyRead(h: RequestHeader, buffer: Uint8Array): void {
    this.#encodeReply(h, WireError.OK, h.length);
    buffer.set(this.#replyHeader);
    this.sender.sendFrame(buffer, () => {
      this.ctx.pool.give(buffer);
      this.releaseMemory(h.length);
    });
    this.end(payloadBytes(h), true);
  }

  #encodeReply(h: RequestHeader, error: number, payloadLength: number): void {
    encodeReplyHeader(this.#replyView, 0, {
      command: h.command,
      txId: h.txId,
      error,
      payloadLength,
    });
  }
}

/** The bytes a request holds while in flight, for the loop's byte limit: counted alike at begin and end. */
function payloadBytes(h: RequestHeader): number {
  return h.command === Command.READ || h.command === Command.WRITE ? h.length : 0;
}
