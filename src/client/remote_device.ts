/**
 * RemoteDevice: a BlockDevice on a DST export. It turns calls into transactions,
 * keeps a bounded window of them in flight on one connection, and hides outages:
 * a dead connection is re-made with backoff and what was in flight is sent again.
 * A caller sees an error only when a transaction used up every resend.
 *
 * Transaction states (a transaction is one request frame and its reply):
 *
 *   submit --> blocked --(earlier overlapping request finished)--+
 *     |                                                          v
 *     +----------------------------------------------------> queued --(window has room,
 *                                                             ^   |     link up)
 *                                        (link dead: resend) |   v
 *                                                            +-- sent --(reply)--> done
 *   blocked or queued --(no link for a timeout, more than `retries` times)--> failed
 *
 * Liveness, not deadlines (protocol README, "Liveness"): a link is dead when nothing
 * arrived from the export for `timeoutMs` while requests were outstanding and a ping
 * went unanswered; bytes arriving, or our own backlog draining into the socket, is
 * life. A slow export (a long fdatasync, a thin link) is never taken for a dead one,
 * so a request on a live link waits as long as it takes. Each dead link counts one
 * attempt for what was on it; while there is no link, each `timeoutMs` counts one
 * attempt for everything waiting, so an outage fails requests after about
 * timeout x (retries + 1).
 *
 * Identity and fencing: every connection carries the client's identity, and the
 * export fences a client's older connections before it answers a newer one. So once
 * a new link's handshake is done, nothing sent on an older link can still execute.
 * A writer also knows its write generation: if a reconnect finds that anyone else
 * wrote in between (or holds the writer lease), it was fenced, and the writes it had
 * queued are failed, never resent over the other writer's data.
 *
 * Invariants (checked by #invariants):
 * 1. Overlapping transactions where either writes are never both queued or sent
 *    (overlap_gate.ts), so a resend never reorders writes. A failed transaction keeps
 *    its place in the gate until the link it was last sent on is fenced (a newer
 *    handshake completed), so no overlapping write can overtake its late delivery.
 * 2. #sent holds exactly the transactions sent on the current link; with no link it is empty.
 * 3. #sentBytes is the payload bytes of #sent; #sent.size <= window.
 * 4. A transaction settles once; after that it is in no queue, map or gate (but a
 *    failed one in #fenceHeld, which holds only its gate place).
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
  type Reconnecting,
  type ReconnectListener,
} from "../device/block_device.ts";
import { formatHostPort, type HostPort } from "../lib/address.ts";
import { assert } from "../lib/assert.ts";
import { type Clock, sleep, systemClock, type Timer } from "../lib/clock.ts";
import { describeError, DeviceError, DstError, ProtocolError } from "../lib/errors.ts";
import { bytesToHex } from "../lib/hex.ts";
import { type Logger, logger } from "../lib/log.ts";
import {
  CLIENT_ID_BYTES,
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
  ServerFeature,
  type ServerHello,
  WIRE_ERROR_NAMES,
} from "../protocol/mod.ts";
import { type ByteConn, closeQuietly } from "../transport/byte_conn.ts";
import { FrameSender } from "../transport/frame_sender.ts";
import { ReceiveBuffer } from "../transport/receive_buffer.ts";
import type { Gated } from "./overlap_gate.ts";
import { OverlapGate } from "./overlap_gate.ts";
import {
  AuthenticationFailed,
  type Dialer,
  dialExport,
  HandshakeRefused,
  tcpDialer,
} from "./dial.ts";
import type { Key } from "../lib/key_file.ts";
import { plural } from "../lib/plural.ts";

export interface RemoteDeviceOptions {
  /**
   * Milliseconds of silence from the export, while requests are outstanding and a
   * ping is unanswered, before the link counts as dead (and, with no link, how long
   * each attempt waits for one).
   */
  timeoutMs?: number;
  /** Dead links (or timeouts without one) a request survives before the caller sees an error. */
  retries?: number;
  /** Milliseconds without sending anything before a ping shows the export we are alive. */
  pingMs?: number;
  /** Transactions in flight at most (capped by what the export allows). */
  window?: number;
  dial?: Dialer;
  clock?: Clock;
  /** Numbers in [0, 1) for the jitter of reconnect delays (default Math.random). */
  random?: () => number;
  log?: Logger;
  /**
   * Whether this client writes (default true): each connection then asks for the
   * export's writer lease and starts a new write generation, reported in its hello.
   * A client that does not write sees the device as read-only and never holds the
   * lease (status queries, control commands, read-only attaches).
   */
  writer?: boolean;
  /**
   * The client's identity (16 bytes), the same on all its connections, so the export
   * can fence the old ones; default: a random one for this RemoteDevice. A mirror
   * keeps its own in its state, so a restarted mirror is the same writer.
   */
  clientId?: Uint8Array;
  /** Prove this key to the export (protocol version 2, protected records); none: version 1. */
  key?: Key;
}

type TxState = "blocked" | "queued" | "sent" | "done";

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
  state: TxState;
  result: Uint8Array | null;
  attempts: number;
  /** While waiting without a link: when this attempt runs out. */
  deadlineMs: number;
  /** The link it was last sent on (its serial), 0 if never sent. */
  sentOnLink: number;
  resolve(result: Uint8Array | null): void;
  reject(error: Error): void;
}

interface ActiveLink {
  /** Counts links from 1; a link with a higher serial was made (and fenced the others) later. */
  serial: number;
  conn: ByteConn;
  sender: FrameSender;
  receive: ReceiveBuffer;
  /**
   * What moved on the socket, counted where it happens (no clock on the data path);
   * #tick turns changes into the times below, a few times per timeout.
   */
  reads: number;
  writes: number;
  writtenBytes: number;
  sends: number;
  /** A socket write took fewer bytes than offered since the last tick: the socket was full. */
  partialWrite: boolean;
  /** The counters as the last tick saw them, and when. */
  seen: { reads: number; writes: number; writtenBytes: number; sends: number; atMs: number };
  /** When the export was last heard from: bytes arrived, or our backlog drained into the socket. */
  heardMs: number;
  /** Bytes written to the socket since bytes last arrived: at most this much may be in buffers. */
  writtenSinceReadBytes: number;
  /** How fast a full socket drained when it last had to (bytes per ms); 0 until it had to. */
  drainBytesPerMs: number;
  /** When we last sent anything on it. */
  sentMs: number;
  /** The liveness ping in flight (it bypasses the window), and when it was sent. */
  probeId: number;
  probeSentMs: number;
}

const NO_RANGE = { start: 0, end: 0 };
const NO_PROBE = 0;

/** WRITE, DISCARD, WRITE_ZEROES: what a fenced writer must not resend. */
function changesData(command: number): boolean {
  return command === Command.WRITE || command === Command.DISCARD ||
    command === Command.WRITE_ZEROES;
}

export class RemoteDevice implements BlockDevice, Reconnecting {
  readonly info: DeviceInfo;
  readonly address: HostPort;
  readonly timeoutMs: number;
  readonly retries: number;
  readonly pingMs: number;
  readonly clientId: Uint8Array;
  readonly #window: number;
  readonly #payloadBytesMax: number;
  readonly #exportId: string;
  readonly #dial: Dialer;
  readonly #clock: Clock;
  readonly #log: Logger;
  readonly #where: string;
  readonly #writer: boolean;
  readonly #key: Key | undefined;
  /** The last authentication failure logged while reconnecting (each new one is logged). */
  #authFailure = "";
  readonly #sharedWriters: boolean;
  #onReconnect: ReconnectListener | null = null;
  #writeGeneration: number;
  #writeEpoch: string;
  /** The export process's instance as of the latest connection (it changes when it restarts). */
  #exportInstance: string;
  /** Why this writer may no longer write: another client took the export's lease. */
  #leaseLost: string | null = null;

  readonly #gate = new OverlapGate();
  /** Transactions not yet settled (counted, not listed: see #waiting). */
  #pending = 0;
  readonly #sent = new Map<number, Transaction>();
  #queue: Transaction[] = [];
  /** Failed transactions whose last link is not fenced yet: they keep their gate place (Invariant 1). */
  #fenceHeld: Transaction[] = [];
  #sentBytes = 0;
  #link: ActiveLink | null = null;
  #linkSerial = 0;
  #reconnecting = false;
  #nextId = 1;
  #closing = false;
  #fatal: Error | null = null;
  #settledWaiters: Array<() => void> = [];
  readonly #ticker: Timer;
  readonly #random: () => number;
  readonly #requestHeader = new Uint8Array(RequestLayout.SIZE);
  readonly #requestView = new DataView(this.#requestHeader.buffer);
  readonly #stats = emptyStats();
  #reconnects = 0;
  #resends = 0;
  #fencedWrites = 0;

  private constructor(
    address: HostPort,
    hello: ServerHello,
    conn: ByteConn,
    options: RemoteDeviceOptions,
    clientId: Uint8Array,
  ) {
    this.address = address;
    this.clientId = clientId;
    this.#where = formatHostPort(address);
    this.timeoutMs = options.timeoutMs ?? CLIENT_TIMEOUT_MS_DEFAULT;
    this.retries = options.retries ?? CLIENT_RETRIES_DEFAULT;
    this.pingMs = options.pingMs ?? CLIENT_PING_MS_DEFAULT;
    // One below the export's limit, so it never stops reading us and a ping always gets in.
    this.#window = Math.max(
      1,
      Math.min(options.window ?? CLIENT_WINDOW_DEFAULT, hello.inFlightMax - 1),
    );
    this.#payloadBytesMax = Math.min(hello.payloadBytesMax, PAYLOAD_BYTES_MAX);
    this.#exportId = bytesToHex(hello.exportId);
    this.#dial = options.dial ?? tcpDialer;
    this.#writer = options.writer ?? true;
    this.#key = options.key;
    this.#sharedWriters = (hello.features & ServerFeature.SHARED_WRITERS) !== 0;
    this.#writeGeneration = hello.writeGeneration;
    this.#writeEpoch = bytesToHex(hello.writeEpoch);
    this.#exportInstance = bytesToHex(hello.exportInstance);
    this.#clock = options.clock ?? systemClock;
    this.#random = options.random ?? Math.random;
    this.#log = options.log ?? logger("client");
    this.info = {
      sizeBytes: hello.sizeBytes,
      blockSize: hello.blockSize,
      readOnly: !this.#writer || (hello.exportFlags & ExportFlag.READ_ONLY) !== 0,
      id: this.#exportId,
      name: this.#where,
    };
    const tickMs = Math.max(
      20,
      Math.min(250, Math.floor(this.timeoutMs / 4), Math.floor(this.pingMs / 2)),
    );
    this.#ticker = this.#clock.every(tickMs, () => this.#tick());
    this.#attach(conn);
  }

  /**
   * Connects to an export; a first connection that fails is an error at once, with the
   * reason (a writer refused because another client holds the lease learns who does).
   */
  static async connect(
    address: HostPort,
    options: RemoteDeviceOptions = {},
  ): Promise<RemoteDevice> {
    const clientId = options.clientId ?? crypto.getRandomValues(new Uint8Array(CLIENT_ID_BYTES));
    assert(clientId.length === CLIENT_ID_BYTES, "a client id is 16 bytes");
    const { conn, hello } = await dialExport(address, {
      dial: options.dial,
      clock: options.clock,
      writer: options.writer ?? true,
      clientId,
      key: options.key,
    });
    return new RemoteDevice(address, hello, conn, options, clientId);
  }

  get connected(): boolean {
    return this.#link !== null;
  }

  /** Called on every reconnect, before anything is resent, with the export's write generation. */
  setReconnectListener(listener: ReconnectListener): void {
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

  /** The export state's epoch as of the latest (re)connect: generations count within it. */
  get writeEpoch(): string {
    return this.#writeEpoch;
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
    fencedWrites: number;
    connected: boolean;
  } {
    return {
      inFlight: this.#sent.size,
      queued: this.#queue.length,
      reconnects: this.#reconnects,
      resends: this.#resends,
      fencedWrites: this.#fencedWrites,
      connected: this.#link !== null,
    };
  }

  /** Waits for every transaction to settle (each is bounded by its retries), then disconnects. */
  async close(): Promise<void> {
    this.#closing = true;
    while (this.#pending > 0) {
      await new Promise<void>((resolve) => this.#settledWaiters.push(resolve));
    }
    // Nothing more will be sent: the gate places of failed writes protect no one now.
    this.#releaseFenceHeld();
    this.#ticker.cancel();
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
    if (this.#leaseLost !== null && changesData(command)) {
      return Promise.reject(new DeviceError("EPERM", this.#leaseLost));
    }
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
        state: "blocked",
        result: null,
        attempts: 0,
        // Only waiting without a link has a clock (liveness governs the rest); see #linkLost.
        deadlineMs: this.#link === null ? this.#clock.nowMs() + this.timeoutMs : 0,
        sentOnLink: 0,
        resolve,
        reject,
      };
      this.#pending += 1;
      if (!ranged || this.#gate.enter(tx)) this.#enqueue(tx);
    });
  }

  /** The gate's callback: `next` waited for nothing more (a failed one stays failed). */
  readonly #unblocked = (next: Gated): void => {
    const tx = next as Transaction;
    if (tx.state === "blocked") this.#enqueue(tx);
  };

  #enqueue(tx: Transaction): void {
    tx.state = "queued";
    if (this.#link === null) tx.deadlineMs = this.#clock.nowMs() + this.timeoutMs;
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
    this.#encodeRequest(tx.command, tx.flags, tx.id, tx.offset, tx.length, tx.payload);
    tx.state = "sent";
    tx.sentOnLink = link.serial;
    this.#sent.set(tx.id, tx);
    this.#sentBytes += tx.windowBytes;
    link.sends += 1;
    link.sender.send(this.#requestHeader, tx.payload ?? undefined);
  }

  #encodeRequest(
    command: number,
    flags: number,
    txId: number,
    offset: number,
    length: number,
    payload: Uint8Array | null,
  ): void {
    encodeRequestHeader(this.#requestView, 0, {
      command,
      flags,
      txId,
      offset: length > 0 ? offset : 0,
      length,
      payloadLength: payload?.length ?? 0,
    });
  }

  /**
   * A liveness ping: sent at once, outside the window (the export admits more than
   * our window, so it is always read), and answered without touching the device.
   */
  #probe(link: ActiveLink): void {
    const id = this.#nextId++;
    this.#encodeRequest(Command.PING, 0, id, 0, 0, null);
    link.probeId = id;
    link.probeSentMs = this.#clock.nowMs();
    link.sentMs = link.probeSentMs;
    link.sender.send(this.#requestHeader);
  }

  // --- replies --------------------------------------------------------------------

  #attach(conn: ByteConn): void {
    assert(this.#link === null, "one link at a time");
    const now = this.#clock.nowMs();
    const link: ActiveLink = {
      serial: ++this.#linkSerial,
      conn: this.#timed(conn, () => link),
      sender: null!,
      receive: new ReceiveBuffer(RECEIVE_SLAB_BYTES, ReplyLayout.SIZE + PAYLOAD_BYTES_MAX),
      reads: 0,
      writes: 0,
      writtenBytes: 0,
      sends: 0,
      partialWrite: false,
      seen: { reads: 0, writes: 0, writtenBytes: 0, sends: 0, atMs: now },
      heardMs: now,
      writtenSinceReadBytes: 0,
      drainBytesPerMs: 0,
      sentMs: now,
      probeId: NO_PROBE,
      probeSentMs: 0,
    };
    link.sender = new FrameSender(link.conn, {
      coalesceBytes: SEND_COALESCE_BYTES,
      zeroCopyBytesMin: SEND_ZERO_COPY_BYTES_MIN,
      queueBytesMax: SEND_QUEUE_BYTES_MAX,
    });
    this.#link = link;
    // This link's handshake fenced every older one: their failed writes can free their places.
    this.#releaseFenceHeld();
    void link.sender.closed.then((reason) => this.#linkLost(link, reason));
    void this.#readReplies(link);
    this.#pump();
    this.#invariants();
  }

  /** The socket as the link uses it, counting reads that brought bytes and writes (see #observe). */
  #timed(conn: ByteConn, link: () => ActiveLink): ByteConn {
    return {
      read: (into) =>
        conn.read(into).then((n) => {
          if (n !== null) link().reads += 1;
          return n;
        }),
      write: (data) =>
        conn.write(data).then((n) => {
          const l = link();
          l.writes += 1;
          l.writtenBytes += n;
          if (n < data.length) l.partialWrite = true;
          return n;
        }),
      close: () => conn.close(),
    };
  }

  /**
   * Turns what the link counted since the last tick into life: bytes read; and writes
   * that drained a full socket (the sender still had bytes waiting, or a write took
   * less than offered), which is the export's TCP taking our bytes, so a large write on
   * a thin link is not silence. Draining also measures the link's rate.
   */
  #observe(link: ActiveLink, now: number): void {
    const seen = link.seen;
    const wrote = link.writtenBytes - seen.writtenBytes;
    if (link.reads !== seen.reads) {
      link.heardMs = now;
      link.writtenSinceReadBytes = 0;
    } else {
      link.writtenSinceReadBytes += wrote;
    }
    const backlogged = link.partialWrite || link.sender.queuedBytes > 0;
    if (backlogged && link.writes !== seen.writes) {
      link.heardMs = now;
      const sample = wrote / Math.max(now - seen.atMs, 1);
      link.drainBytesPerMs = link.drainBytesPerMs === 0
        ? sample
        : link.drainBytesPerMs * (1 - DRAIN_RATE_WEIGHT) + sample * DRAIN_RATE_WEIGHT;
    }
    if (link.sends !== seen.sends) link.sentMs = now;
    link.partialWrite = false;
    link.seen = {
      reads: link.reads,
      writes: link.writes,
      writtenBytes: link.writtenBytes,
      sends: link.sends,
      atMs: now,
    };
  }

  /**
   * After our last write went into the socket, up to a socket's worth of it can still
   * sit in kernel buffers on the way, and a ping queued behind it cannot be answered
   * before it crossed. On a link that has shown it is thin (a full socket had to
   * drain), that takes (what may be buffered) / (the rate it drained at): the link is
   * not dead before that time has passed on top of the timeout.
   */
  #drainAllowanceMs(link: ActiveLink): number {
    if (link.drainBytesPerMs === 0) return 0;
    return Math.min(link.writtenSinceReadBytes, SOCKET_BUFFERED_BYTES_MAX) / link.drainBytesPerMs;
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
          if (header.txId === link.probeId && link.probeId !== NO_PROBE) {
            if (header.command !== Command.PING || header.payloadLength !== 0) {
              throw new ProtocolError(`reply to ping ${header.txId} is malformed`);
            }
            receive.skip(ReplyLayout.SIZE);
            link.probeId = NO_PROBE;
            continue;
          }
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
        this.#pump();
      }
    } catch (error) {
      this.#linkLost(link, error);
    }
  }

  #settle(tx: Transaction, error: number): void {
    this.#finishTx(tx);
    if (tx.length > 0) this.#gate.finish(tx, this.#unblocked);
    if (error === 0) {
      this.#count(tx);
      tx.resolve(tx.result);
    } else {
      this.#stats.errors += 1;
      tx.reject(this.#wireError(tx, error));
    }
    this.#wakeSettledWaiters();
  }

  /**
   * Fails a transaction that is not sent (blocked or queued). If it was ever sent and
   * its last link is not fenced yet, it keeps its gate place until a newer link's
   * handshake has fenced that one (Invariant 1): its late delivery can then no longer
   * run after an overlapping write that was waiting behind it.
   */
  #fail(tx: Transaction, error: Error): void {
    assert(tx.state !== "sent", "a sent transaction is not failed, its link is dropped first");
    if (tx.state === "queued") this.#queue = this.#queue.filter((queued) => queued !== tx);
    this.#finishTx(tx);
    this.#stats.errors += 1;
    if (tx.length > 0) {
      const fenced = tx.sentOnLink === 0 ||
        (this.#link !== null && this.#link.serial > tx.sentOnLink);
      if (fenced) this.#gate.finish(tx, this.#unblocked);
      else this.#fenceHeld.push(tx);
    }
    tx.reject(error);
    this.#wakeSettledWaiters();
  }

  /**
   * Every transaction that waits to be sent (queued, or blocked in the gate), oldest
   * first: the rare paths (a dead link, fencing, giving up) look here; the data path
   * keeps no list of its own.
   */
  #waiting(): Transaction[] {
    const blocked: Transaction[] = [];
    for (const item of this.#gate.items()) {
      if ((item as Transaction).state === "blocked") blocked.push(item as Transaction);
    }
    return [...this.#queue, ...blocked].sort((a, b) => a.id - b.id);
  }

  #finishTx(tx: Transaction): void {
    assert(tx.state !== "done", "Invariant 4: a transaction settles once");
    tx.state = "done";
    this.#pending -= 1;
  }

  #releaseFenceHeld(): void {
    const held = this.#fenceHeld;
    if (held.length === 0) return;
    this.#fenceHeld = [];
    for (const tx of held) this.#gate.finish(tx, this.#unblocked);
  }

  #wakeSettledWaiters(): void {
    if (this.#settledWaiters.length === 0) return;
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
        s.discardBytes += tx.length;
        break;
      case Command.WRITE_ZEROES:
        s.zeroes += 1;
        s.zeroBytes += tx.length;
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

  /**
   * The link is dead: what was sent on it counts one attempt and goes back to the
   * front of the queue (or fails, past its retries), and reconnecting starts.
   */
  #linkLost(link: ActiveLink, reason: unknown): void {
    if (this.#link !== link) return;
    this.#link = null;
    link.sender.abort(reason);
    closeQuietly(link.conn);
    const now = this.#clock.nowMs();
    const resend = [...this.#sent.values()].sort((a, b) => a.id - b.id);
    this.#sent.clear();
    this.#sentBytes = 0;
    for (const tx of resend) tx.state = "queued";
    this.#queue = resend.concat(this.#queue);
    // Without a link, each waiting transaction's clock starts now.
    for (const tx of this.#waiting()) tx.deadlineMs = now + this.timeoutMs;
    this.#resends += resend.length;
    this.#invariants();
    const failed = this.#countAttempt(resend, reason);
    if (this.#closing && this.#pending === 0) return;
    this.#log.warn(
      `lost ${this.#where}: ${describeError(reason)}; reconnecting` +
        (resend.length > failed ? `, ${resend.length - failed} in flight will be resent` : ""),
    );
    void this.#reconnect();
  }

  /** One attempt of each of `txs` ran out; those past their retries fail. Returns how many. */
  #countAttempt(txs: Transaction[], reason: unknown): number {
    let failed = 0;
    for (const tx of txs) {
      tx.attempts += 1;
      if (tx.attempts <= this.retries) continue;
      failed += 1;
      this.#fail(
        tx,
        new DeviceError(
          "ETIMEDOUT",
          `${COMMAND_NAMES[tx.command]} to ${this.#where} failed after ` +
            `${plural(tx.attempts, "attempt")} ` +
            `(${describeError(reason)}); the export is down or unreachable`,
        ),
      );
    }
    return failed;
  }

  async #reconnect(): Promise<void> {
    if (this.#reconnecting) return;
    this.#reconnecting = true;
    let delayMs = RECONNECT_DELAY_MS_MIN;
    try {
      while (this.#link === null && this.#fatal === null) {
        if (this.#closing && this.#pending === 0) return;
        await sleep(this.#clock, delayMs * (0.5 + this.#random()));
        delayMs = Math.min(delayMs * 2, RECONNECT_DELAY_MS_MAX);
        let conn: ByteConn;
        let hello: ServerHello;
        try {
          ({ conn, hello } = await dialExport(this.address, {
            dial: this.#dial,
            clock: this.#clock,
            writer: this.#writer && this.#leaseLost === null,
            clientId: this.clientId,
            key: this.#key,
          }));
        } catch (error) {
          if (error instanceof HandshakeRefused && error.code === "WRITE_LEASE_HELD") {
            this.#loseLease(error.message);
            delayMs = RECONNECT_DELAY_MS_MIN; // as a reader it is welcome at once
          } else if (error instanceof AuthenticationFailed) {
            // The keys no longer match (rotated on one side only): say so, once per reason.
            if (error.message !== this.#authFailure) this.#log.warn(error.message);
            this.#authFailure = error.message;
          } else {
            this.#log.debug(`reconnect to ${this.#where} failed: ${describeError(error)}`);
          }
          continue;
        }
        if (this.#closing && this.#pending === 0) {
          closeQuietly(conn); // closed while dialing: nothing to send, and no lease to hold
          return;
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
        const epoch = bytesToHex(hello.writeEpoch);
        const otherWriters = this.#othersWrote(hello.writeGeneration, epoch);
        this.#writeGeneration = hello.writeGeneration;
        this.#writeEpoch = epoch;
        const instance = bytesToHex(hello.exportInstance);
        const restarted = instance !== this.#exportInstance;
        this.#exportInstance = instance;
        this.#onReconnect?.({
          writeGeneration: hello.writeGeneration,
          writeEpoch: epoch,
          restarted,
        });
        if (otherWriters !== null) this.#fenced(otherWriters);
        this.#log.info(
          `reconnected to ${this.#where}; resending ${plural(this.#queue.length, "transaction")}`,
        );
        this.#attach(conn);
      }
    } finally {
      this.#reconnecting = false;
    }
  }

  /**
   * Why the writes this client has queued must not go out, or null: the export's
   * write generation moved, so it granted another client writing since our last
   * connection (whose data stale writes would overwrite).
   */
  #othersWrote(generation: number, epoch: string): string | null {
    if (!this.#writer || this.info.readOnly || this.#sharedWriters) return null;
    if (this.#leaseLost !== null) return null; // a reader now: it starts no generation
    if (epoch !== this.#writeEpoch) {
      return `${this.#where} lost its write state (a new epoch): whoever wrote meanwhile ` +
        "cannot be known";
    }
    if (generation === this.#writeGeneration) return null;
    return `another client wrote to ${this.#where} while this one was away ` +
      `(write generation ${generation}, expected ${this.#writeGeneration})`;
  }

  /**
   * Another client holds the write lease this one had: it was fenced. Its waiting
   * writes fail, and so does every later one (EPERM): from now on it reconnects as a
   * reader, so reads go on. Writing again takes a new client (restart the attach or
   * the array), once the other writer is gone: never a silent overwrite of its data.
   */
  #loseLease(reason: string): void {
    const first = this.#leaseLost === null;
    this.#leaseLost = `${this.#where} gave the write lease to another client: ${reason}. ` +
      `This client only reads from now on; restart it to write again`;
    if (first) this.#log.error(this.#leaseLost);
    this.#fenced(reason);
  }

  /**
   * This writer was fenced (the lease is another's, or another client wrote): every
   * write it had waiting fails and is never resent. Reads go on, and so do later writes
   * while it holds the lease.
   */
  #fenced(why: string): void {
    const dropped = this.#waiting().filter((tx) => changesData(tx.command));
    if (dropped.length === 0) {
      this.#log.warn(`${this.#where}: ${why}`);
      return;
    }
    this.#fencedWrites += dropped.length;
    this.#log.error(
      `fenced by ${this.#where}: ${why}; ${dropped.length} queued writes fail and are not resent`,
    );
    const error = new DeviceError(
      "EIO",
      `fenced by ${this.#where}: ${why}; the write was not resent`,
    );
    for (const tx of dropped) if (tx.state !== "done") this.#fail(tx, error);
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
    assert(this.#sent.size === 0, "Invariant 2: nothing sent without a link");
    for (const tx of this.#waiting()) if (tx.state !== "done") this.#fail(tx, error);
  }

  /**
   * A few times per timeout: the link's liveness and keep-alive pings; without a link,
   * the clocks of what waits for one.
   */
  #tick(): void {
    const now = this.#clock.nowMs();
    const link = this.#link;
    if (link !== null) {
      this.#observe(link, now);
      const outstanding = this.#sent.size > 0 || link.probeId !== NO_PROBE;
      const quietMs = now - link.heardMs;
      if (
        outstanding && quietMs >= this.timeoutMs + this.#drainAllowanceMs(link) &&
        link.probeId !== NO_PROBE &&
        now - link.probeSentMs >= this.timeoutMs / 2
      ) {
        this.#linkLost(
          link,
          new Error(`nothing from the export for ${Math.round(quietMs)} ms, not even a ping reply`),
        );
        return;
      }
      const quietWithWork = outstanding && quietMs >= this.timeoutMs / 2;
      if (link.probeId === NO_PROBE && (quietWithWork || now - link.sentMs >= this.pingMs)) {
        this.#probe(link);
      }
      return;
    }
    const waiting = this.#waiting().filter((tx) => tx.deadlineMs <= now);
    if (waiting.length === 0) return;
    for (const tx of waiting) tx.deadlineMs = now + this.timeoutMs;
    this.#countAttempt(waiting, new Error(`no connection for ${this.timeoutMs} ms`));
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

/** How much each new drain-rate sample moves the estimate (smooths bursty partial writes). */
const DRAIN_RATE_WEIGHT = 0.25;
/**
 * The most that can sit in kernel buffers between our write and the export's read:
 * Linux's largest default send buffer (4 MiB) and as much again received but unread.
 */
const SOCKET_BUFFERED_BYTES_MAX = 8 * 1024 * 1024;

function toWireFlags(flags: IoFlags | undefined): number {
  if (flags === undefined) return 0;
  return (flags.fua ? RequestFlag.FUA : 0) | (flags.preflush ? RequestFlag.PREFLUSH : 0);
}
