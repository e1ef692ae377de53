/**
 * The simulation's network: connections between simulated processes, carried in
 * memory, with the faults a real network has: random latency, partitions that hold
 * bytes silently, a client whose link dropped while the server never heard, and an old
 * connection's bytes arriving late. Every delivery is a scheduler timer and the only
 * randomness is the seeded `random`, so a run replays exactly.
 */

import { formatHostPort, type HostPort, parseHostPort } from "../../src/lib/address.ts";
import type { Timer } from "../../src/lib/clock.ts";
import type { Dialer } from "../../src/client/dial.ts";
import type { ByteConn } from "../../src/transport/byte_conn.ts";
import type { AcceptedConn, ConnListener } from "../../src/transport/accept_loop.ts";
import type { Scheduler, SimProcess } from "./scheduler.ts";

export interface NetworkOptions {
  random: () => number;
  /** Each chunk's delay, a whole number of ms drawn uniformly from [min, max]. */
  latencyMs: { min: number; max: number };
  /** How long a dial into a partition waits before it fails (default 1000 ms). */
  connectTimeoutMs?: number;
}

/** A chunk on its way; null data is the sender's EOF. */
interface Chunk {
  data: Uint8Array | null;
  readyAt: number;
}

/** Anything a process owns on the network that its death must close. */
interface Closable {
  close(): void;
}

/**
 * One direction of a connection. Chunks leave in order, one timer for the head at a
 * time; while the direction is blocked (a partition, or held for late delivery) the
 * head waits and everything behind it waits too, so order survives every fault.
 */
class Pipe {
  readonly #queue: Chunk[] = [];
  #lastReadyAt = 0;
  #timer: Timer | null = null;
  /** Set by cutClientSide(late): the bytes wait for deliverLate(). */
  heldLate = false;

  constructor(
    readonly net: SimNetwork,
    readonly fromHost: string,
    readonly toHost: string,
    readonly to: SimConn,
  ) {}

  get idle(): boolean {
    return this.#queue.length === 0;
  }

  send(data: Uint8Array | null): void {
    const readyAt = Math.max(this.net.scheduler.nowMs() + this.net.latency(), this.#lastReadyAt);
    this.#lastReadyAt = readyAt;
    this.#queue.push({ data, readyAt });
    if (this.#queue.length === 1) this.#arm();
  }

  /** Lets held chunks go: none arrives before `at`, and the order stays. */
  release(at: number): void {
    if (this.#queue.length === 0) return;
    for (const chunk of this.#queue) chunk.readyAt = Math.max(chunk.readyAt, at);
    this.#lastReadyAt = Math.max(this.#lastReadyAt, at);
    this.#timer?.cancel();
    this.#timer = null;
    this.#arm();
  }

  /** Drops what is left; used when neither end can read it any more. */
  discard(): void {
    this.#timer?.cancel();
    this.#timer = null;
    this.#queue.length = 0;
  }

  #blocked(): boolean {
    return this.heldLate || this.net.isPartitioned(this.fromHost) ||
      this.net.isPartitioned(this.toHost);
  }

  #arm(): void {
    const head = this.#queue[0];
    if (head === undefined || this.#blocked()) return;
    this.#timer = this.net.scheduler.at(head.readyAt - this.net.scheduler.nowMs(), () => {
      this.#timer = null;
      this.#pump();
    });
  }

  #pump(): void {
    const now = this.net.scheduler.nowMs();
    while (!this.#blocked()) {
      const head = this.#queue[0];
      if (head === undefined || head.readyAt > now) break;
      this.#queue.shift();
      this.to.deliver(head.data);
    }
    this.#arm();
  }
}

/** One end of a simulated connection. */
class SimConn implements AcceptedConn {
  /** Delivered chunks not yet read; the first may be partly read. */
  readonly #inbox: Uint8Array[] = [];
  #offset = 0;
  #eof = false;
  #closed = false;
  #closeError: Error | null = null;
  readonly #readers: { into: Uint8Array; resolve: (n: number | null) => void }[] = [];
  /** Where this end's writes go; set once both ends exist. */
  out!: Pipe;

  constructor(
    readonly owner: SimProcess,
    readonly remoteAddr: Deno.NetAddr,
    readonly localAddr: Deno.NetAddr,
    readonly onClosed: (end: SimConn) => void,
  ) {}

  get closed(): boolean {
    return this.#closed;
  }

  read(into: Uint8Array): Promise<number | null> {
    if (this.#closed) return Promise.resolve(null);
    if (this.#readers.length === 0) {
      const n = this.#take(into);
      if (n !== undefined) return Promise.resolve(n);
    }
    return new Promise((resolve) => this.#readers.push({ into, resolve }));
  }

  write(data: Uint8Array): Promise<number> {
    if (!this.owner.alive) {
      return Promise.reject(new Deno.errors.BadResource(`process ${this.owner.name} is dead`));
    }
    if (this.#closed) return Promise.reject(this.#closeError);
    // A copy: the caller may reuse its buffer as soon as the write resolves.
    if (data.length > 0) this.out.send(data.slice());
    return Promise.resolve(data.length);
  }

  close(): void {
    this.shut(new Deno.errors.BadResource("connection closed"));
  }

  /** Closes this side with the error its later writes get; the peer gets EOF after the bytes in flight. */
  shut(error: Error): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#closeError = error;
    this.#inbox.length = 0;
    for (const reader of this.#readers.splice(0)) reader.resolve(null);
    this.out.send(null);
    this.onClosed(this);
  }

  /** A chunk arrives from the peer (null: the peer's EOF). A closed end drops it. */
  deliver(data: Uint8Array | null): void {
    if (this.#closed) return;
    if (data === null) this.#eof = true;
    else this.#inbox.push(data);
    while (this.#readers.length > 0) {
      const n = this.#take(this.#readers[0]!.into);
      if (n === undefined) break;
      this.#readers.shift()!.resolve(n);
    }
  }

  /** What a read gets now: a count, null at EOF, or undefined when it must wait. */
  #take(into: Uint8Array): number | null | undefined {
    if (into.length === 0) return 0;
    let n = 0;
    while (n < into.length && this.#inbox.length > 0) {
      const chunk = this.#inbox[0]!;
      const part = chunk.subarray(this.#offset, this.#offset + into.length - n);
      into.set(part, n);
      n += part.length;
      this.#offset += part.length;
      if (this.#offset === chunk.length) {
        this.#inbox.shift();
        this.#offset = 0;
      }
    }
    if (n > 0) return n;
    return this.#eof ? null : undefined;
  }
}

/** A connection as the network tracks it: open while either end is. */
interface Connection {
  readonly address: string;
  readonly client: SimConn;
  readonly server: SimConn;
}

class SimListener implements ConnListener {
  readonly #backlog: SimConn[] = [];
  readonly #waiters: { resolve: (c: AcceptedConn) => void; reject: (e: Error) => void }[] = [];
  #closed = false;

  constructor(
    readonly owner: SimProcess,
    readonly addr: Deno.NetAddr,
    readonly onClosed: (listener: SimListener) => void,
  ) {}

  get closed(): boolean {
    return this.#closed;
  }

  accept(): Promise<AcceptedConn> {
    const conn = this.#backlog.shift();
    if (conn !== undefined) return Promise.resolve(conn);
    if (this.#closed) return Promise.reject(new Deno.errors.BadResource("listener closed"));
    return new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }));
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const waiter of this.#waiters.splice(0)) {
      waiter.reject(new Deno.errors.BadResource("listener closed"));
    }
    // Connections nobody accepted end with the listener, as a kernel resets its backlog.
    for (const conn of this.#backlog.splice(0)) conn.close();
    this.onClosed(this);
  }

  enqueue(conn: SimConn): void {
    const waiter = this.#waiters.shift();
    if (waiter !== undefined) waiter.resolve(conn);
    else this.#backlog.push(conn);
  }
}

export class SimNetwork {
  readonly #random: () => number;
  readonly #latency: { min: number; max: number };
  readonly #connectTimeoutMs: number;
  readonly #listeners = new Map<string, SimListener>();
  readonly #connections = new Set<Connection>();
  readonly #partitioned = new Set<string>();
  /** Client-to-server directions of cut connections whose bytes wait for deliverLate(). */
  readonly #late = new Set<Pipe>();
  /** What each process owns, closed when it is killed (one hook per process, not per connection). */
  readonly #owned = new Map<SimProcess, Set<Closable>>();
  #nextPort = 49152;

  constructor(readonly scheduler: Scheduler, options: NetworkOptions) {
    const { min, max } = options.latencyMs;
    if (!(Number.isInteger(min) && Number.isInteger(max) && 0 <= min && min <= max)) {
      throw new RangeError(`latencyMs must be whole numbers with 0 <= min <= max`);
    }
    this.#random = options.random;
    this.#latency = { min, max };
    this.#connectTimeoutMs = options.connectTimeoutMs ?? 1000;
  }

  /** One draw of a link's delay. */
  latency(): number {
    const { min, max } = this.#latency;
    return min + Math.floor(this.#random() * (max - min + 1));
  }

  isPartitioned(host: string): boolean {
    return this.#partitioned.has(host);
  }

  listen(owner: SimProcess, address: string): ConnListener {
    if (!owner.alive) throw new Error(`process ${owner.name} is dead`);
    const { hostname, port } = parseHostPort(address, "localhost");
    const key = formatHostPort({ hostname, port });
    if (this.#listeners.has(key)) throw new Deno.errors.AddrInUse(`${key} is already in use`);
    const listener = new SimListener(owner, { transport: "tcp", hostname, port }, (closed) => {
      if (this.#listeners.get(key) === closed) this.#listeners.delete(key);
      this.#disown(owner, closed);
    });
    this.#listeners.set(key, listener);
    this.#own(owner, listener);
    return listener;
  }

  dialer(owner: SimProcess, fromHost: string): Dialer {
    return (address) => this.#dial(owner, fromHost, address);
  }

  #dial(owner: SimProcess, fromHost: string, address: HostPort): Promise<ByteConn> {
    const key = formatHostPort(address);
    return new Promise((resolve, reject) => {
      if (!owner.alive) {
        reject(new Deno.errors.BadResource(`process ${owner.name} is dead`));
        return;
      }
      const start = this.scheduler.nowMs();
      const blocked = () =>
        this.#partitioned.has(fromHost) || this.#partitioned.has(address.hostname);
      // A dial into a partition gets no answer at all; it fails when its wait runs out.
      const timeOut = () =>
        this.scheduler.at(start + this.#connectTimeoutMs - this.scheduler.nowMs(), () => {
          reject(new Deno.errors.TimedOut(`connection to ${key} timed out`));
        });
      if (blocked()) {
        timeOut();
        return;
      }
      this.scheduler.at(this.latency(), () => {
        if (!owner.alive) {
          reject(new Deno.errors.BadResource(`process ${owner.name} is dead`));
          return;
        }
        if (blocked()) {
          timeOut();
          return;
        }
        const listener = this.#listeners.get(key);
        if (listener === undefined || listener.closed) {
          reject(new Deno.errors.ConnectionRefused(`connection refused: ${key}`));
          return;
        }
        resolve(this.#connect(owner, fromHost, listener));
      });
    });
  }

  #connect(owner: SimProcess, fromHost: string, listener: SimListener): SimConn {
    const server = listener.addr;
    const client: Deno.NetAddr = { transport: "tcp", hostname: fromHost, port: this.#nextPort++ };
    const address = formatHostPort(server);
    const onClosed = (end: SimConn) => {
      this.#disown(end.owner, end);
      if (connection.client.closed && connection.server.closed) this.#forget(connection);
    };
    const clientEnd = new SimConn(owner, server, client, onClosed);
    const serverEnd = new SimConn(listener.owner, client, server, onClosed);
    clientEnd.out = new Pipe(this, fromHost, server.hostname, serverEnd);
    serverEnd.out = new Pipe(this, server.hostname, fromHost, clientEnd);
    const connection: Connection = { address, client: clientEnd, server: serverEnd };
    this.#connections.add(connection);
    this.#own(clientEnd.owner, clientEnd);
    this.#own(serverEnd.owner, serverEnd);
    listener.enqueue(serverEnd);
    return clientEnd;
  }

  /** Once both ends are closed nobody can read what is still in flight: drop it. */
  #forget(connection: Connection): void {
    this.#connections.delete(connection);
    for (const end of [connection.client, connection.server]) {
      end.out.discard();
      this.#late.delete(end.out);
    }
  }

  partition(host: string, on: boolean): void {
    if (on) {
      this.#partitioned.add(host);
      return;
    }
    if (!this.#partitioned.delete(host)) return;
    // What was held goes out after one delay from the heal, in the order it was sent.
    for (const { client, server } of this.#connections) {
      for (const pipe of [client.out, server.out]) {
        if (pipe.idle || (pipe.fromHost !== host && pipe.toHost !== host)) continue;
        pipe.release(this.scheduler.nowMs() + this.latency());
      }
    }
  }

  cutClientSide(address: string, options: { late: boolean }): number {
    const { hostname, port } = parseHostPort(address, "localhost");
    const key = formatHostPort({ hostname, port });
    let cut = 0;
    for (const connection of [...this.#connections]) {
      if (connection.address !== key || connection.client.closed) continue;
      cut += 1;
      if (options.late) {
        connection.client.out.heldLate = true;
        this.#late.add(connection.client.out);
      }
      connection.client.shut(new Deno.errors.ConnectionReset(`connection to ${key} was cut`));
    }
    return cut;
  }

  deliverLate(): void {
    for (const pipe of this.#late) {
      pipe.heldLate = false;
      pipe.release(this.scheduler.nowMs() + this.latency());
    }
    this.#late.clear();
  }

  openConnections(address?: string): number {
    if (address === undefined) return this.#connections.size;
    const { hostname, port } = parseHostPort(address, "localhost");
    const key = formatHostPort({ hostname, port });
    let count = 0;
    for (const connection of this.#connections) if (connection.address === key) count += 1;
    return count;
  }

  #own(owner: SimProcess, thing: Closable): void {
    let things = this.#owned.get(owner);
    if (things === undefined) {
      const set = new Set<Closable>();
      things = set;
      this.#owned.set(owner, set);
      owner.onKill(() => {
        this.#owned.delete(owner);
        for (const each of [...set]) each.close();
      });
    }
    things.add(thing);
  }

  #disown(owner: SimProcess, thing: Closable): void {
    this.#owned.get(owner)?.delete(thing);
  }
}
