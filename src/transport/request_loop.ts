/**
 * The server side of one connection in its request phase, for any protocol (DST, NBD):
 * read the socket in large chunks, let the protocol dispatch every whole frame that
 * arrived, and queue each reply the moment its request completes, so replies leave
 * out of order and every reply ready in one event-loop turn leaves in one write.
 *
 * What this class owns: the receive buffer and the sender, the count and payload
 * bytes of requests in flight, backpressure and a clean stop. What the subclass
 * owns: the frame format, validation and the device calls.
 *
 * Limits: past `inFlightMax` requests or `inFlightBytesMax` payload bytes in flight,
 * or a full send queue, the loop stops dispatching (even frames already received)
 * and stops reading, until replies drain. So memory stays bounded whatever a client
 * sends. One request is always admitted, so the largest frame still goes through.
 *
 * Two ways to end a connection from this side: stop() answers what was dispatched and
 * then closes (a clean shutdown); fence() closes at once and drops every frame not yet
 * dispatched, then waits for the dispatched ones to finish, for a connection its
 * client has replaced (protocol README, "Fencing").
 *
 * Time limits, so a client cannot hold its place (one of CLIENTS_PER_EXPORT_MAX) while
 * doing nothing with it. Past any of them the connection is closed as by fence(), with
 * one log line: what was dispatched still finishes (writes land), replies are dropped.
 * - Idle (`idleMs`, DST only): nothing in flight, nothing to send, nothing received.
 * - Frame (FRAME_TIMEOUT_MS): a frame not whole that long after its first byte.
 * - Send stall (SEND_STALL_MS): replies waiting, and no socket write done for that long.
 * A timer checks them every CONNECTION_CHECK_MS; the data path only counts reads and
 * writes, it never reads the clock, so each limit holds to within one check.
 */

import {
  CLOSE_LINGER_MS,
  CONNECTION_CHECK_MS,
  FRAME_TIMEOUT_MS,
  RECEIVE_SLAB_BYTES,
  SEND_COALESCE_BYTES,
  SEND_STALL_MS,
  SEND_ZERO_COPY_BYTES_MIN,
} from "../constants.ts";
import { assert } from "../lib/assert.ts";
import { type Clock, systemClock, type Timer } from "../lib/clock.ts";
import { errnoOf } from "../lib/errno.ts";
import { describeError } from "../lib/errors.ts";
import type { Logger } from "../lib/log.ts";
import { type ByteConn, closeQuietly } from "./byte_conn.ts";
import { FrameSender } from "./frame_sender.ts";
import { ReceiveBuffer, type Slab } from "./receive_buffer.ts";
import type { MemoryBudget } from "./memory_budget.ts";

export interface RequestLoopLimits {
  inFlightMax: number;
  inFlightBytesMax: number;
  /** The export's payload memory, shared with its other connections (--memory); null: none. */
  budget?: MemoryBudget | null;
  sendQueueBytesMax: number;
  /** The largest frame a client may send (header and payload). */
  frameBytesMax: number;
  /** The fixed size of a request header: what must arrive before anything can be parsed. */
  headerBytes: number;
  /**
   * A connection with nothing in flight, nothing to send and nothing received for this
   * long is closed; null: never (for clients that keep idle connections and do not ping).
   */
  idleMs: number | null;
}

/** A frame that cannot be trusted: the connection closes with this log line. */
export const CLOSE = -1;

/** Rejections logged per connection before the rest are only counted (a flood stays one screen). */
const REJECTIONS_LOGGED_MAX = 5;

/**
 * How long a value has stayed the same, as far as calls to forMs() saw: it moves to the
 * time of the call that first sees a new value.
 */
class Unchanged {
  constructor(private value = Number.NaN, private sinceMs = 0) {}

  forMs(value: number, nowMs: number): number {
    if (value !== this.value) {
      this.value = value;
      this.sinceMs = nowMs;
    }
    return nowMs - this.sinceMs;
  }

  /** Forgets the value: the next forMs() counts from then. */
  reset(): void {
    this.value = Number.NaN;
  }
}

/**
 * What a connection's client has asked so far, for its log lines: nothing yet, only
 * for status (as `dst status` does, every few seconds with --watch), or real work (any
 * other request, a ping included). Only work is news at info.
 */
export type Asked = "nothing" | "status" | "work";

export abstract class RequestLoop {
  protected readonly receive: ReceiveBuffer;
  protected readonly sender: FrameSender;
  #inFlight = 0;
  #inFlightBytes = 0;
  /** A request with a payload waits for the export's memory budget (mustWaitForMemory). */
  #waitingForMemory = false;
  #rejectionsLogged = 0;
  #stopping = false;
  #idleWaiters: Array<() => void> = [];
  readonly #clock: Clock;
  /** Socket reads that brought bytes, and socket writes done: counted, not timed, on the data path. */
  #reads = 0;
  #writes = 0;
  /** serve() waits on the socket for frame number `#frames` (or for its first byte). */
  #reading = false;
  #frames = 0;
  /** A time limit closed the connection. */
  #expired = false;
  #watchdog: Timer | null = null;
  readonly #silence: Unchanged;
  readonly #idle = new Unchanged();
  readonly #partialFrame = new Unchanged();
  readonly #sendStall = new Unchanged();
  /** The socket as this loop uses it: every read that brings bytes and every write is progress. */
  readonly #timedConn: ByteConn;
  #asked: Asked = "nothing";
  readonly #working = Promise.withResolvers<void>();

  constructor(
    readonly conn: ByteConn,
    readonly peer: string,
    protected readonly log: Logger,
    readonly limits: RequestLoopLimits,
    clock: Clock = systemClock,
  ) {
    this.#clock = clock;
    this.#silence = new Unchanged(0, clock.nowMs());
    this.#timedConn = {
      read: (into) =>
        conn.read(into).then((n) => {
          if (n !== null) this.#reads += 1;
          return n;
        }),
      write: (data) =>
        conn.write(data).then((n) => {
          this.#writes += 1;
          return n;
        }),
      close: () => conn.close(),
    };
    this.receive = new ReceiveBuffer(RECEIVE_SLAB_BYTES, limits.frameBytesMax);
    this.sender = new FrameSender(this.#timedConn, {
      coalesceBytes: SEND_COALESCE_BYTES,
      zeroCopyBytesMin: SEND_ZERO_COPY_BYTES_MIN,
      queueBytesMax: limits.sendQueueBytesMax,
    });
    if (!this.answersStatusQueries) this.noteRequest(false);
  }

  /** What the client has asked so far (Asked). */
  get asked(): Asked {
    return this.#asked;
  }

  /** Resolves at the client's first request that is not a status query. */
  get working(): Promise<void> {
    return this.#working.promise;
  }

  /**
   * Whether this protocol has status queries (DST's STATUS). Without them every
   * connection is work from the start, as every NBD connection is.
   */
  protected get answersStatusQueries(): boolean {
    return false;
  }

  /** The subclass saw a request: a status query, or anything else. */
  protected noteRequest(statusQuery: boolean): void {
    if (this.#asked === "work") return;
    if (statusQuery) {
      this.#asked = "status";
      return;
    }
    this.#asked = "work";
    this.#working.resolve();
  }

  /** Stopping or fenced: nothing more is dispatched. */
  protected get stopping(): boolean {
    return this.#stopping;
  }

  get inFlight(): number {
    return this.#inFlight;
  }

  /**
   * How long no byte has moved on the socket, either way, as far as calls to this have
   * seen (the exporter asks every few seconds, so it is exact to that). A live client sends at least
   * its pings, which this side always reads (its limits sit above a client's window);
   * one that stopped reading our replies stalls our writes too.
   */
  silentMs(): number {
    return this.#silence.forMs(this.#reads + this.#writes, this.#clock.nowMs());
  }

  /**
   * Dispatches whole frames from `this.receive` while `saturated()` is false. Returns
   * the bytes the next frame needs to be whole, or CLOSE.
   */
  protected abstract dispatchArrived(): number;

  /** Serves requests until the client leaves, breaks the protocol, or stop() is called. */
  async serve(): Promise<void> {
    let need = this.limits.headerBytes;
    let closing = false;
    const idleMs = this.limits.idleMs;
    const checkMs = Math.min(CONNECTION_CHECK_MS, idleMs === null ? Infinity : idleMs / 4);
    this.#watchdog = this.#clock.every(checkMs, () => this.#checkLimits());
    try {
      while (!this.#stopping) {
        this.#frames += 1;
        this.#reading = true;
        const filled = await this.receive.fill(this.#timedConn, need);
        this.#reading = false;
        if (!filled || this.#stopping) break;
        need = this.dispatchArrived();
        if (need === CLOSE) {
          closing = true;
          break;
        }
        await this.#backpressure();
      }
    } catch (error) {
      if (!this.#stopping) {
        this.log.debug(`${this.peer}: connection ended: ${describeError(error)}`);
      }
    }
    await this.#finish(closing);
  }

  /** Stops reading requests; what is in flight is finished and answered, then the socket closes. */
  async stop(): Promise<void> {
    this.#stopping = true;
    await this.#finish();
  }

  /**
   * Fences this connection: closes it now, so no frame that has not been dispatched
   * ever is (those already received are dropped with the buffer), and resolves once
   * every dispatched request has finished on the device. Their replies are not sent.
   */
  async fence(): Promise<void> {
    this.#stopping = true;
    this.sender.abort(new Error("fenced"));
    closeQuietly(this.conn);
    while (this.#inFlight > 0) await this.#nextEnd();
  }

  /** The connection has ended and nothing of it is in flight: release what it holds. */
  protected ended(): void {}

  protected saturated(): boolean {
    return this.#inFlight >= this.limits.inFlightMax ||
      (this.#inFlight > 0 && this.#inFlightBytes >= this.limits.inFlightBytesMax) ||
      this.#waitingForMemory;
  }

  /**
   * Whether a request whose frame carries `payloadBytes` (a WRITE's data, still to be
   * read) must wait for the export's memory budget. When it must, the loop dispatches
   * and reads nothing more until some is released. A connection with nothing in flight
   * never waits: its pings queue behind the waiting frame, and a client whose pings go
   * unanswered takes a busy export for a dead one. So incoming payloads can exceed the
   * budget by one request per connection that had nothing else going. (READs, whose
   * memory is the export's to allocate, wait elsewhere without stopping the connection:
   * export_connection.ts.)
   */
  protected mustWaitForMemory(payloadBytes: number): boolean {
    if (payloadBytes === 0 || this.#inFlight === 0) return false;
    if (!(this.limits.budget?.spent ?? false)) return false;
    this.#waitingForMemory = true;
    return true;
  }

  /**
   * A request was dispatched; `payloadBytes` counts towards the byte limit until end(),
   * and is charged to the export's memory budget until end() or releaseMemory().
   */
  protected begin(payloadBytes: number): void {
    this.#inFlight += 1;
    this.#inFlightBytes += payloadBytes;
    this.limits.budget?.charge(payloadBytes);
  }

  /** Gives back budget that end() was told the reply still holds (once it is sent). */
  protected releaseMemory(payloadBytes: number): void {
    this.limits.budget?.release(payloadBytes);
  }

  /**
   * Its reply was queued. `holdsMemory`: the reply carries the payload, which stays
   * charged to the budget until releaseMemory() (when it has been sent).
   */
  protected end(payloadBytes: number, holdsMemory = false): void {
    this.#inFlight -= 1;
    this.#inFlightBytes -= payloadBytes;
    if (!holdsMemory) this.limits.budget?.release(payloadBytes);
    assert(this.#inFlight >= 0 && this.#inFlightBytes >= 0, "end() follows begin()");
    if (this.#idleWaiters.length > 0) this.#wake(); // each waiter re-checks its own condition
  }

  /**
   * Logs a refused request, `${peer}: ${what}`, while fewer than REJECTIONS_LOGGED_MAX
   * were; the last one logged says that further ones are only counted.
   */
  protected logRejection(what: string): void {
    if (this.#rejectionsLogged >= REJECTIONS_LOGGED_MAX) return;
    this.#rejectionsLogged += 1;
    const more = this.#rejectionsLogged === REJECTIONS_LOGGED_MAX
      ? " (further ones only counted)"
      : "";
    this.log.warn(`${this.peer}: ${what}${more}`);
  }

  /**
   * Finishes a dispatched device call: a `leased` slab (a WRITE's payload) is released,
   * then `succeed()` runs, or, after one log line, `fail(errno, message)` with the error
   * as the Linux errno both protocols carry.
   */
  protected complete(
    done: Promise<void>,
    what: string,
    succeed: () => void,
    fail: (errno: number, message: string) => void,
    leased: Slab | null = null,
  ): void {
    done.then(
      () => {
        if (leased !== null) this.receive.release(leased);
        succeed();
      },
      (error) => {
        if (leased !== null) this.receive.release(leased);
        const message = describeError(error);
        this.log.warn(`${this.peer}: ${what} failed: ${message}`);
        fail(errnoOf(error), message);
      },
    );
  }

  /**
   * `linger`: this side ended the connection while the client may still be sending.
   * The time limits stay on until the socket is closed: a client that reads no reply
   * could otherwise hold up the drain for ever.
   */
  async #finish(linger = false): Promise<void> {
    while (this.#inFlight > 0) await this.#nextEnd();
    await this.sender.drain();
    if (linger && !this.#stopping && !this.sender.broken) await this.#linger();
    closeQuietly(this.conn); // also wakes a serve() that is blocked reading
    this.#watchdog?.cancel();
    this.ended();
  }

  /** Runs every check interval from serve() until the connection is closed. */
  #checkLimits(): void {
    if (this.#expired) return;
    const now = this.#clock.nowMs();
    const sending = this.sender.queuedBytes > 0 && !this.sender.broken;
    if (!sending) this.#sendStall.reset();
    const stalledMs = sending ? this.#sendStall.forMs(this.#writes, now) : 0;
    if (stalledMs >= SEND_STALL_MS) {
      this.#expire(`no reply could be sent for ${seconds(stalledMs)} s (the client reads none)`);
      return;
    }
    if (this.#stopping) return; // no longer reading: only the replies' limit applies
    const partial = this.#reading && this.receive.available > 0;
    if (!partial) this.#partialFrame.reset();
    const partialMs = partial ? this.#partialFrame.forMs(this.#frames, now) : 0;
    if (partialMs >= FRAME_TIMEOUT_MS) {
      this.#expire(`a frame was not whole ${seconds(partialMs)} s after its first byte`);
      return;
    }
    const idleLimitMs = this.limits.idleMs;
    const idle = idleLimitMs !== null && this.#reading && !partial && this.#inFlight === 0 &&
      !sending;
    if (!idle) this.#idle.reset();
    const idleMs = idle ? this.#idle.forMs(this.#reads, now) : 0;
    if (idle && idleMs >= idleLimitMs) {
      this.#expire(`sent nothing for ${seconds(idleMs)} s with nothing in flight`);
    }
  }

  /**
   * Closes the connection at once, as fence() does: frames not dispatched are dropped;
   * what was dispatched finishes (serve() waits for it), and its replies are dropped.
   */
  #expire(why: string): void {
    this.#expired = true;
    this.#stopping = true;
    this.log.warn(`${this.peer}: ${why}; closing this connection`);
    this.sender.abort(new Error(why));
    closeQuietly(this.conn);
  }

  /**
   * Ends this side's stream after the last reply, then reads and drops what the client
   * still sends until it closes too, for CLOSE_LINGER_MS at most. Closing with bytes
   * unread would make the kernel reset the connection, and the reset drops the replies
   * the client has not read yet: the answers to the requests dispatched before the frame
   * that ended the connection would be lost. A connection without a half-close (the
   * simulation's) closes at once.
   */
  async #linger(): Promise<void> {
    const conn = this.conn as ByteConn & { closeWrite?: () => Promise<void> };
    if (typeof conn.closeWrite !== "function") return;
    const timer = this.#clock.after(CLOSE_LINGER_MS, () => closeQuietly(conn));
    try {
      await conn.closeWrite();
      const dropped = new Uint8Array(64 * 1024);
      while ((await conn.read(dropped)) !== null) {
        // What comes after the end is not read as frames, only drained.
      }
    } catch {
      // Closed (by the timer, a fence or the client): nothing more to wait for.
    } finally {
      timer.cancel();
    }
  }

  async #backpressure(): Promise<void> {
    const budget = this.limits.budget;
    for (;;) {
      if (this.#waitingForMemory && !(budget?.spent ?? false)) this.#waitingForMemory = false;
      if (!this.saturated() || this.sender.broken) break;
      // The budget frees when any connection's request ends, not only this one's.
      await (budget ? Promise.race([this.#nextEnd(), budget.whenReleased()]) : this.#nextEnd());
    }
    await this.sender.whenWritable();
  }

  #nextEnd(): Promise<void> {
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  #wake(): void {
    const waiters = this.#idleWaiters;
    this.#idleWaiters = [];
    for (const wake of waiters) wake();
  }
}

function seconds(ms: number): number {
  return Math.round(ms / 1000);
}
