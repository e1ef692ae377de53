/**
 * One NBD client in the transmission phase (doc/proto.md, "Transmission"): requests
 * parsed in place, validated completely, then run against the BlockDevice; replies
 * out of order as each completes (the loop, limits and backpressure are RequestLoop's).
 *
 * Errors as the spec maps them: EINVAL for reads and trims past the end, unknown
 * commands and flags; ENOSPC for writes and write-zeroes past the end; EPERM for
 * writes to a read-only export; EIO for device failures (including a DST transaction
 * that used up its resends). After an error reply the connection stays usable: an
 * invalid WRITE's payload is drained.
 * A request with a bad magic, or a WRITE too large to drain, closes the connection
 * with one log line. DISC: what is in flight is finished and answered, then close.
 *
 * With structured replies negotiated, READ is answered with one OFFSET_DATA chunk (or
 * one ERROR chunk); every other command with a simple reply, as the spec allows.
 */

import {
  IN_FLIGHT_BYTES_PER_CONNECTION_MAX,
  IN_FLIGHT_PER_CONNECTION_MAX,
  SEND_QUEUE_BYTES_MAX,
} from "../constants.ts";
import type { BlockDevice } from "../device/block_device.ts";
import type { BufferPool } from "../lib/buffer_pool.ts";
import { FirstWriteGate } from "../server/first_write_gate.ts";
import type { WriteGrant } from "../server/writer_lease.ts";
import type { Clock } from "../lib/clock.ts";
import type { Logger } from "../lib/log.ts";
import type { ByteConn } from "../transport/byte_conn.ts";
import type { Slab } from "../transport/receive_buffer.ts";
import { CLOSE, RequestLoop } from "../transport/request_loop.ts";
import {
  BLOCK_SIZE_MAX,
  Cmd,
  CMD_NAMES,
  CmdFlag,
  NbdError,
  OffsetDataLayout,
  REPLY_FLAG_DONE,
  ReplyType,
  REQUEST_MAGIC,
  RequestLayout as R,
  SIMPLE_REPLY_MAGIC,
  SimpleReplyLayout as Simple,
  STRUCTURED_REPLY_MAGIC,
  StructuredReplyLayout as Chunk,
} from "./wire.ts";

interface NbdRequest {
  flags: number;
  type: number;
  cookieHigh: number;
  cookieLow: number;
  offset: number;
  length: number;
}

/** What a connection needs from its server. */
export interface NbdContext {
  readonly device: BlockDevice;
  readonly pool: BufferPool;
  readonly log: Logger;
  readonly structuredReplies: boolean;
  /**
   * Asks for a write grant (the export's writer lease and a new write generation)
   * before this connection's first write; null: this server keeps no lease.
   */
  readonly acquire: (() => Promise<WriteGrant>) | null;
  /** Where the connection's time limits run (default the system's clock). */
  readonly clock?: Clock;
}

/**
 * The flags each command accepts; FAST_ZERO and DF are not advertised, so they are
 * invalid. FUA is valid on every command (the spec: a server that advertises
 * SEND_FUA MUST accept it everywhere, and clients are known to set it on reads and
 * flushes); a read writes nothing and a flush is durable anyway, so there it changes
 * nothing. DISC is not here: it ends the connection before any validation.
 */
const FLAGS_ALLOWED: Record<number, number> = {
  [Cmd.READ]: CmdFlag.FUA,
  [Cmd.WRITE]: CmdFlag.FUA,
  [Cmd.FLUSH]: CmdFlag.FUA,
  [Cmd.TRIM]: CmdFlag.FUA,
  [Cmd.WRITE_ZEROES]: CmdFlag.FUA | CmdFlag.NO_HOLE,
};

/** A structured OFFSET_DATA header (chunk header and offset) is the largest reply header before read data. */
const READ_HEADROOM = Chunk.SIZE + OffsetDataLayout.data;
const TWO_32 = 2 ** 32;

/** What a failed device call's log line names, per command: built once, not per request. */
const FAILED_WHAT: Record<number, string> = Object.fromEntries(
  Object.entries(CMD_NAMES).map(([code, name]) => [code, `NBD ${name}`]),
);

export class NbdConnection extends RequestLoop {
  /** Where reply headers are encoded: large enough for any, including a READ's headroom. */
  readonly #header = new Uint8Array(READ_HEADROOM);
  readonly #headerView = new DataView(this.#header.buffer);
  readonly #simpleHeader = this.#header.subarray(0, Simple.SIZE);
  readonly #chunkHeader = this.#header.subarray(0, Chunk.SIZE);
  readonly #writes: FirstWriteGate;

  constructor(conn: ByteConn, peer: string, readonly ctx: NbdContext) {
    super(conn, peer, ctx.log, {
      inFlightMax: IN_FLIGHT_PER_CONNECTION_MAX,
      inFlightBytesMax: IN_FLIGHT_BYTES_PER_CONNECTION_MAX,
      sendQueueBytesMax: SEND_QUEUE_BYTES_MAX,
      frameBytesMax: R.SIZE + BLOCK_SIZE_MAX,
      headerBytes: R.SIZE,
      // No idle limit: NBD has no ping, and the kernel, qemu and nbdfuse keep a connection
      // open, silent, for as long as the disk is attached; closing it would break them.
      idleMs: null,
    }, ctx.clock);
    this.#writes = new FirstWriteGate(ctx.acquire);
  }

  protected override ended(): void {
    this.#writes.release();
  }

  protected dispatchArrived(): number {
    const receive = this.receive;
    while (receive.available >= R.SIZE && !this.saturated()) {
      const view = receive.view;
      const at = receive.position;
      const magic = view.getUint32(at + R.magic);
      if (magic !== REQUEST_MAGIC) {
        this.log.warn(
          `${this.peer}: NBD request with bad magic 0x${
            magic.toString(16)
          }; closing this connection`,
        );
        return CLOSE;
      }
      const offsetHigh = view.getUint32(at + R.offset);
      const request: NbdRequest = {
        flags: view.getUint16(at + R.flags),
        type: view.getUint16(at + R.type),
        cookieHigh: view.getUint32(at + R.cookie),
        cookieLow: view.getUint32(at + R.cookie + 4),
        // An offset of 2^53 or more cannot be inside any device; -1 fails every range check.
        offset: offsetHigh < 2 ** 21 ? offsetHigh * TWO_32 + view.getUint32(at + R.offset + 4) : -1,
        length: view.getUint32(at + R.length),
      };
      const payload = request.type === Cmd.WRITE ? request.length : 0;
      if (payload > BLOCK_SIZE_MAX) {
        this.log.warn(
          `${this.peer}: NBD WRITE of ${payload} bytes > ${BLOCK_SIZE_MAX} (too large to drain); closing this connection`,
        );
        return CLOSE;
      }
      if (receive.available < R.SIZE + payload) return R.SIZE + payload;
      receive.skip(R.SIZE);
      if (request.type === Cmd.DISC) {
        this.log.debug(`${this.peer}: NBD client disconnects`);
        return CLOSE; // the loop finishes and answers what is in flight, then closes
      }
      const rejection = this.#validate(request);
      if (rejection !== null) {
        receive.skip(payload); // drained: the stream stays framed
        this.#reject(request, rejection.error, rejection.reason);
        continue;
      }
      this.#execute(request);
    }
    return R.SIZE;
  }

  #validate(r: NbdRequest): { error: number; reason: string } | null {
    const name = CMD_NAMES[r.type];
    const allowed = FLAGS_ALLOWED[r.type];
    if (name === undefined || allowed === undefined) {
      return { error: NbdError.EINVAL, reason: `unsupported command ${name ?? r.type}` };
    }
    if ((r.flags & ~allowed) !== 0) {
      return {
        error: NbdError.EINVAL,
        reason: `${name}: flags 0x${(r.flags & ~allowed).toString(16)} not allowed`,
      };
    }
    const info = this.ctx.device.info;
    if (r.type === Cmd.FLUSH) return null;
    const writes = r.type !== Cmd.READ;
    if (writes && info.readOnly) {
      return { error: NbdError.EPERM, reason: `${name}: the export is read-only` };
    }
    if (r.length === 0) return { error: NbdError.EINVAL, reason: `${name}: length is 0` };
    if (r.type === Cmd.READ && r.length > BLOCK_SIZE_MAX) {
      return { error: NbdError.EINVAL, reason: `READ of ${r.length} bytes > ${BLOCK_SIZE_MAX}` };
    }
    if (r.offset < 0 || r.offset + r.length > info.sizeBytes) {
      // The spec: ENOSPC for a write past the end, EINVAL for a read or trim past it.
      const noSpace = r.type === Cmd.WRITE || r.type === Cmd.WRITE_ZEROES;
      return {
        error: noSpace ? NbdError.ENOSPC : NbdError.EINVAL,
        reason:
          `${name} of ${r.length} bytes at offset ${r.offset}: the export is ${info.sizeBytes} bytes`,
      };
    }
    return null;
  }

  #reject(r: NbdRequest, error: number, reason: string): void {
    this.logRejection(`refused NBD request: ${reason}`);
    this.begin(payloadBytes(r));
    this.#replyError(r, error, reason);
  }

  #execute(r: NbdRequest): void {
    const device = this.ctx.device;
    const fua = (r.flags & CmdFlag.FUA) !== 0;
    this.begin(payloadBytes(r));
    switch (r.type) {
      case Cmd.READ: {
        // Room for the reply header in front of the data: header and data leave in one write.
        const buffer = this.ctx.pool.take(READ_HEADROOM + r.length);
        this.complete(
          device.read(r.offset, buffer.subarray(READ_HEADROOM)),
          "NBD READ",
          () => this.#replyRead(r, buffer),
          (errno, message) => {
            this.ctx.pool.give(buffer);
            this.#replyError(r, errno, message);
          },
        );
        return;
      }
      case Cmd.WRITE: {
        const slab = this.receive.lease();
        const data = this.receive.take(r.length);
        this.#settle(r, this.#writes.run(() => device.write(r.offset, data, { fua })), slab);
        return;
      }
      case Cmd.FLUSH:
        this.#settle(r, device.flush());
        return;
      case Cmd.TRIM:
        this.#settle(r, this.#writes.run(() => device.discard(r.offset, r.length, { fua })));
        return;
      case Cmd.WRITE_ZEROES:
        // NO_HOLE needs nothing: zeroes are always written, never punched as holes.
        this.#settle(r, this.#writes.run(() => device.writeZeroes(r.offset, r.length, { fua })));
        return;
    }
  }

  /** A device call answered with a simple reply; `leased` holds a WRITE's payload until it ends. */
  #settle(r: NbdRequest, done: Promise<void>, leased: Slab | null = null): void {
    this.complete(
      done,
      FAILED_WHAT[r.type]!,
      () => this.#replySimple(r, NbdError.OK),
      (errno, message) => this.#replyError(r, errno, message),
      leased,
    );
  }

  /**
   * `buffer` holds the data after READ_HEADROOM bytes. The reply header is encoded as any
   * other, then copied just before the data, so header and data leave in one write.
   */
  #replyRead(r: NbdRequest, buffer: Uint8Array): void {
    let header: Uint8Array;
    if (this.ctx.structuredReplies) {
      const length = buffer.length - READ_HEADROOM;
      this.#encodeChunk(r, ReplyType.OFFSET_DATA, OffsetDataLayout.data + length);
      const at = Chunk.SIZE + OffsetDataLayout.offset;
      this.#headerView.setUint32(at, Math.floor(r.offset / TWO_32));
      this.#headerView.setUint32(at + 4, r.offset % TWO_32);
      header = this.#header; // the chunk header and the offset: READ_HEADROOM bytes
    } else {
      this.#encodeSimple(r, NbdError.OK);
      header = this.#simpleHeader;
    }
    const start = READ_HEADROOM - header.length;
    buffer.set(header, start);
    this.sender.sendFrame(buffer.subarray(start), () => this.ctx.pool.give(buffer));
    this.end(payloadBytes(r));
  }

  #replyError(r: NbdRequest, error: number, message: string): void {
    if (r.type === Cmd.READ && this.ctx.structuredReplies) {
      const text = new TextEncoder().encode(message.slice(0, 200));
      const payload = new Uint8Array(6 + text.length);
      const view = new DataView(payload.buffer);
      view.setUint32(0, error);
      view.setUint16(4, text.length);
      payload.set(text, 6);
      this.#encodeChunk(r, ReplyType.ERROR, payload.length);
      this.sender.send(this.#chunkHeader, payload);
      this.end(payloadBytes(r));
      return;
    }
    this.#replySimple(r, error);
  }

  #replySimple(r: NbdRequest, error: number): void {
    this.#encodeSimple(r, error);
    this.sender.send(this.#simpleHeader);
    this.end(payloadBytes(r));
  }

  #encodeSimple(r: NbdRequest, error: number): void {
    const v = this.#headerView;
    v.setUint32(Simple.magic, SIMPLE_REPLY_MAGIC);
    v.setUint32(Simple.error, error);
    v.setUint32(Simple.cookie, r.cookieHigh);
    v.setUint32(Simple.cookie + 4, r.cookieLow);
  }

  #encodeChunk(r: NbdRequest, type: number, length: number): void {
    const v = this.#headerView;
    v.setUint32(Chunk.magic, STRUCTURED_REPLY_MAGIC);
    v.setUint16(Chunk.flags, REPLY_FLAG_DONE);
    v.setUint16(Chunk.type, type);
    v.setUint32(Chunk.cookie, r.cookieHigh);
    v.setUint32(Chunk.cookie + 4, r.cookieLow);
    v.setUint32(Chunk.length, length);
  }
}

/** The bytes a request holds while in flight, for the loop's byte limit: counted alike at begin and end. */
function payloadBytes(r: NbdRequest): number {
  return r.type === Cmd.READ || r.type === Cmd.WRITE ? r.length : 0;
}
