/**
 * One client connection of an export: the transmission phase after the handshake.
 *
 * Requests are parsed in place from large socket reads and dispatched as soon as
 * they are whole; each reply is queued the moment its request completes, so replies
 * go out of order, and every reply ready in one turn of the event loop leaves in
 * one socket write. A request that is well framed but invalid gets an error reply
 * (its payload was already read, so the stream stays framed); a frame that cannot
 * be trusted closes the connection with one log line. The export itself goes on.
 *
 * Limits: at most IN_FLIGHT_PER_CONNECTION_MAX requests and IN_FLIGHT_BYTES_PER_CONNECTION_MAX
 * payload bytes outstanding, and at most SEND_QUEUE_BYTES_MAX of replies queued; past
 * any of them, the connection stops dispatching (even frames already received) and
 * reading until it drains, so memory stays bounded whatever the client sends.
 */

import {
  IN_FLIGHT_BYTES_PER_CONNECTION_MAX,
  IN_FLIGHT_PER_CONNECTION_MAX,
  PAYLOAD_BYTES_MAX,
  RECEIVE_SLAB_BYTES,
  SEND_COALESCE_BYTES,
  SEND_QUEUE_BYTES_MAX,
  SEND_ZERO_COPY_BYTES_MIN,
} from "../constants.ts";
import type { BlockDevice, IoFlags } from "../device/block_device.ts";
import type { BufferPool } from "../lib/buffer_pool.ts";
import { describeError, DeviceError } from "../lib/errors.ts";
import type { Logger } from "../lib/log.ts";
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
import { type ByteConn, closeQuietly } from "../transport/byte_conn.ts";
import { FrameSender } from "../transport/frame_sender.ts";
import { ReceiveBuffer } from "../transport/receive_buffer.ts";

/** What a connection needs from its export. */
export interface ExportContext {
  readonly device: BlockDevice;
  readonly pool: BufferPool;
  readonly log: Logger;
  /** The STATUS reply, built when asked. */
  statusJson(): Uint8Array;
  /** Counts a request the export refused or a frame that broke the protocol. */
  countError(): void;
}

/** Rejections logged per connection before the rest are only counted (a flood stays one screen). */
const REJECTIONS_LOGGED_MAX = 5;

const ERRNO_TO_WIRE: Record<string, WireError> = {
  EPERM: WireError.EPERM,
  EIO: WireError.EIO,
  ENOMEM: WireError.ENOMEM,
  EINVAL: WireError.EINVAL,
  ENOSPC: WireError.ENOSPC,
  ENOTSUP: WireError.ENOTSUP,
};

export class ExportConnection {
  #inFlight = 0;
  #inFlightBytes = 0;
  #stopping = false;
  #rejectionsLogged = 0;
  #idleWaiters: Array<() => void> = [];
  readonly #receive = new ReceiveBuffer(RECEIVE_SLAB_BYTES, RequestLayout.SIZE + PAYLOAD_BYTES_MAX);
  readonly #sender: FrameSender;
  readonly #replyHeader = new Uint8Array(ReplyLayout.SIZE);
  readonly #replyView = new DataView(this.#replyHeader.buffer);

  constructor(readonly conn: ByteConn, readonly peer: string, readonly ctx: ExportContext) {
    this.#sender = new FrameSender(conn, {
      coalesceBytes: SEND_COALESCE_BYTES,
      zeroCopyBytesMin: SEND_ZERO_COPY_BYTES_MIN,
      queueBytesMax: SEND_QUEUE_BYTES_MAX,
    });
  }

  get inFlight(): number {
    return this.#inFlight;
  }

  /** Serves requests until the client leaves, breaks the protocol, or stop() is called. */
  async serve(): Promise<void> {
    const receive = this.#receive;
    let need: number = RequestLayout.SIZE;
    try {
      while (!this.#stopping) {
        if (!(await receive.fill(this.conn, need))) break;
        if (this.#stopping) break;
        need = this.#dispatchArrived();
        if (need < 0) break;
        await this.#backpressure();
      }
    } catch (error) {
      if (!this.#stopping) {
        this.ctx.log.debug(`${this.peer}: connection ended: ${describeError(error)}`);
      }
    }
    await this.#whenIdle();
    await this.#sender.drain();
    closeQuietly(this.conn);
  }

  /** Stops reading requests; what is in flight is finished and answered, then the socket closes. */
  async stop(): Promise<void> {
    this.#stopping = true;
    await this.#whenIdle();
    await this.#sender.drain();
    closeQuietly(this.conn); // wakes a serve() that is blocked reading
  }

  /** Dispatches every whole frame in the buffer; returns the bytes the next frame needs, or -1. */
  #dispatchArrived(): number {
    const receive = this.#receive;
    while (receive.available >= RequestLayout.SIZE && !this.#saturated()) {
      const header = decodeRequestHeader(receive.view, receive.position);
      if (typeof header === "string") {
        this.ctx.countError();
        this.ctx.log.warn(`${this.peer}: ${header}; closing this connection`);
        return -1;
      }
      const frameBytes = RequestLayout.SIZE + header.payloadLength;
      if (receive.available < frameBytes) return frameBytes;
      receive.skip(RequestLayout.SIZE);
      const rejection = validateRequest(header) ?? this.#checkAgainstExport(header);
      if (rejection !== null) {
        receive.skip(header.payloadLength); // drained: the stream stays framed
        this.#reject(header, rejection);
        continue;
      }
      this.#execute(header);
    }
    return RequestLayout.SIZE;
  }

  #saturated(): boolean {
    return this.#inFlight >= IN_FLIGHT_PER_CONNECTION_MAX ||
      (this.#inFlight > 0 && this.#inFlightBytes >= IN_FLIGHT_BYTES_PER_CONNECTION_MAX);
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
    if (this.#rejectionsLogged < REJECTIONS_LOGGED_MAX) {
      this.#rejectionsLogged += 1;
      const more = this.#rejectionsLogged === REJECTIONS_LOGGED_MAX
        ? " (further ones only counted)"
        : "";
      this.ctx.log.warn(`${this.peer}: refused request ${h.txId}: ${rejection.reason}${more}`);
    }
    this.#inFlight += 1;
    this.#reply(h, rejection.error);
  }

  #execute(h: RequestHeader): void {
    const device = this.ctx.device;
    const flags: IoFlags = {
      fua: (h.flags & RequestFlag.FUA) !== 0,
      preflush: (h.flags & RequestFlag.PREFLUSH) !== 0,
    };
    this.#inFlight += 1;
    switch (h.command) {
      case Command.READ: {
        this.#inFlightBytes += h.length;
        const into = this.ctx.pool.take(h.length);
        device.read(h.offset, into).then(
          () => {
            this.#inFlightBytes -= h.length;
            this.#reply(h, WireError.OK, into, () => this.ctx.pool.give(into));
          },
          (error) => {
            this.#inFlightBytes -= h.length;
            this.ctx.pool.give(into);
            this.#replyFailure(h, error);
          },
        );
        return;
      }
      case Command.WRITE: {
        this.#inFlightBytes += h.length;
        const slab = this.#receive.lease();
        const data = this.#receive.take(h.payloadLength);
        this.#settle(h, device.write(h.offset, data, flags), () => {
          this.#inFlightBytes -= h.length;
          this.#receive.release(slab);
        });
        return;
      }
      case Command.FLUSH:
        this.#settle(h, device.flush());
        return;
      case Command.DISCARD:
        this.#settle(h, device.discard(h.offset, h.length, flags));
        return;
      case Command.WRITE_ZEROES:
        this.#settle(h, device.writeZeroes(h.offset, h.length, flags));
        return;
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
    }
  }

  #settle(h: RequestHeader, done: Promise<void>, release?: () => void): void {
    done.then(
      () => {
        release?.();
        this.#reply(h, WireError.OK);
      },
      (error) => {
        release?.();
        this.#replyFailure(h, error);
      },
    );
  }

  #replyFailure(h: RequestHeader, error: unknown): void {
    // The device counted this failure in its own stats; counting it here too would double it.
    const code = error instanceof DeviceError
      ? ERRNO_TO_WIRE[error.errno] ?? WireError.EIO
      : WireError.EIO;
    this.ctx.log.warn(`${this.peer}: ${COMMAND_NAMES[h.command]} failed: ${describeError(error)}`);
    this.#reply(h, code);
  }

  #reply(h: RequestHeader, error: number, payload?: Uint8Array, onSent?: () => void): void {
    encodeReplyHeader(this.#replyView, 0, {
      command: h.command,
      txId: h.txId,
      error,
      payloadLength: payload?.length ?? 0,
    });
    this.#sender.send(this.#replyHeader, payload, onSent);
    this.#inFlight -= 1;
    if (this.#idleWaiters.length > 0) this.#wakeIdle(); // each waiter re-checks its own condition
  }

  async #backpressure(): Promise<void> {
    while (this.#saturated() && !this.#sender.broken) {
      await new Promise<void>((resolve) => this.#idleWaiters.push(resolve));
    }
    await this.#sender.whenWritable();
  }

  #whenIdle(): Promise<void> {
    if (this.#inFlight === 0) return Promise.resolve();
    return new Promise<void>((resolve) => this.#idleWaiters.push(resolve)).then(() =>
      this.#whenIdle()
    );
  }

  #wakeIdle(): void {
    const waiters = this.#idleWaiters;
    this.#idleWaiters = [];
    for (const wake of waiters) wake();
  }
}
