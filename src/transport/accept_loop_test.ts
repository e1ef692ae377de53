/**
 * The accept loop against a scripted listener and a clock the test turns: an accept
 * that fails for a passing reason (EMFILE) is retried with a backoff instead of ending
 * the server, and one address cannot take more than its share of the connections.
 */

import assert from "node:assert/strict";
import type { Clock, Timer } from "../lib/clock.ts";
import type { Logger } from "../lib/log.ts";
import {
  type AcceptedConn,
  AcceptLoop,
  CLIENT_SLOTS_SHARED_BYTES,
  type ClientSlots,
  clientSlots,
  type ConnListener,
} from "./accept_loop.ts";

/** Time that moves only when the test fires a timer; tells the test when one is set. */
class TurnedClock implements Clock {
  #now = 0;
  #next = Promise.withResolvers<{ ms: number; fire: () => void }>();

  nowMs(): number {
    return this.#now;
  }

  after(ms: number, fn: () => void): Timer {
    let cancelled = false;
    const fire = () => {
      this.#now += ms;
      if (!cancelled) fn();
    };
    this.#next.resolve({ ms, fire });
    this.#next = Promise.withResolvers();
    return { cancel: () => void (cancelled = true) };
  }

  every(): Timer {
    throw new Error("the accept loop sets no repeating timer");
  }

  /** The next timer set from now on. */
  nextTimer(): Promise<{ ms: number; fire: () => void }> {
    return this.#next.promise;
  }

  advance(ms: number): void {
    this.#now += ms;
  }
}

class LinesLog implements Logger {
  readonly lines: string[] = [];
  #next = Promise.withResolvers<string>();
  debug(message: string): void {
    this.#add(`DEBUG ${message}`);
  }
  info(message: string): void {
    this.#add(`INFO ${message}`);
  }
  warn(message: string): void {
    this.#add(`WARN ${message}`);
  }
  error(message: string): void {
    this.#add(`ERROR ${message}`);
  }
  count(pattern: RegExp): number {
    return this.lines.filter((line) => pattern.test(line)).length;
  }
  /** The next line logged from now on. */
  nextLine(): Promise<string> {
    return this.#next.promise;
  }
  #add(line: string): void {
    this.lines.push(line);
    this.#next.resolve(line);
    this.#next = Promise.withResolvers();
  }
}

/** A connection that only knows whether it was closed. */
class FakeConn implements AcceptedConn {
  readonly closed = Promise.withResolvers<void>();
  isClosed = false;
  constructor(readonly remoteAddr: Deno.Addr) {}
  read(): Promise<number | null> {
    return this.closed.promise.then(() => null);
  }
  write(data: Uint8Array): Promise<number> {
    return Promise.resolve(data.length);
  }
  close(): void {
    this.isClosed = true;
    this.closed.resolve();
  }
}

function tcpFrom(hostname: string, port: number): FakeConn {
  return new FakeConn({ transport: "tcp", hostname, port });
}

function unixConn(): FakeConn {
  return new FakeConn({ transport: "unix", path: "" });
}

/** What Deno throws when the process is out of descriptors: a plain Error with a code. */
function emfile(): Error {
  return Object.assign(new Error("Too many open files (os error 24)"), { code: "EMFILE" });
}

/** A listener whose accepts return what the test queues, in order. */
class ScriptedListener implements ConnListener {
  readonly addr: Deno.Addr = { transport: "tcp", hostname: "127.0.0.1", port: 1 };
  readonly #queue: (AcceptedConn | Error)[] = [];
  #waiter: PromiseWithResolvers<AcceptedConn> | null = null;
  #closed = false;

  push(item: AcceptedConn | Error): void {
    if (this.#waiter === null) {
      this.#queue.push(item);
      return;
    }
    const waiter = this.#waiter;
    this.#waiter = null;
    if (item instanceof Error) waiter.reject(item);
    else waiter.resolve(item);
  }

  accept(): Promise<AcceptedConn> {
    if (this.#closed) {
      return Promise.reject(new Deno.errors.BadResource("Listener has been closed"));
    }
    const item = this.#queue.shift();
    if (item instanceof Error) return Promise.reject(item);
    if (item !== undefined) return Promise.resolve(item);
    this.#waiter = Promise.withResolvers();
    return this.#waiter.promise;
  }

  close(): void {
    this.#closed = true;
    this.#waiter?.reject(new Deno.errors.BadResource("Listener has been closed"));
    this.#waiter = null;
  }
}

/**
 * Sessions that hold their connection until it is closed (from the test's side) and
 * then turn it away; `started` resolves with each connection as its session starts.
 */
class Sessions {
  readonly conns: AcceptedConn[] = [];
  #next = Promise.withResolvers<AcceptedConn>();

  readonly session = async (conn: AcceptedConn) => {
    this.conns.push(conn);
    this.#next.resolve(conn);
    this.#next = Promise.withResolvers();
    await (conn as FakeConn).closed.promise;
    return null;
  };

  started(): Promise<AcceptedConn> {
    return this.#next.promise;
  }
}

/** clientSlots that tell the test when a connection's address place is given back. */
function watchedSlots(perAddressMax: number) {
  const slots = clientSlots(64, undefined, perAddressMax);
  let left = Promise.withResolvers<string>();
  const watched: ClientSlots = {
    ...slots,
    leaveAddress(address) {
      slots.leaveAddress(address);
      left.resolve(address);
      left = Promise.withResolvers();
    },
  };
  return { slots: watched, nextLeave: () => left.promise };
}

function setup(perAddressMax = 16) {
  const listener = new ScriptedListener();
  const clock = new TurnedClock();
  const log = new LinesLog();
  const sessions = new Sessions();
  const { slots, nextLeave } = watchedSlots(perAddressMax);
  const loop = new AcceptLoop(listener, slots, sessions.session, log, clock);
  return { listener, clock, log, sessions, loop, nextLeave };
}

const FAILED = /accept failed.*retrying/;

Deno.test("accept: EMFILE backs off (10 ms doubling to 1 s, one log line) and the loop keeps accepting", async () => {
  const { listener, clock, log, sessions, loop } = setup();
  const delays: number[] = [];
  for (let failure = 0; failure < 9; failure++) {
    const timer = clock.nextTimer();
    listener.push(emfile());
    const { ms, fire } = await timer;
    delays.push(ms);
    fire();
  }
  assert.deepEqual(delays, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
  assert.equal(log.count(FAILED), 1, log.lines.join("\n"));
  assert.equal(log.count(/no longer listening/), 0, log.lines.join("\n"));

  const conn = tcpFrom("10.0.0.1", 1000);
  const started = sessions.started();
  listener.push(conn);
  assert.equal(await started, conn, "accepted after the failures");

  // A success ends the episode: the next failure starts again at 10 ms, with a line.
  const timer = clock.nextTimer();
  listener.push(emfile());
  const again = await timer;
  assert.equal(again.ms, 10);
  assert.equal(log.count(FAILED), 2, log.lines.join("\n"));

  // A shutdown in the middle of a backoff does not wait for it.
  conn.close();
  await loop.shutdown();
  assert.equal(log.count(/no longer listening/), 0, "a shutdown is not a failure");
});

Deno.test("accept: a listener closed under the loop ends it with one error line, not a retry", async () => {
  const { listener, log, loop } = setup();
  const line = log.nextLine();
  listener.close();
  assert.match(await line, /ERROR accept failed, no longer listening: Listener has been closed/);
  await loop.shutdown();
  assert.equal(log.count(/no longer listening/), 1, log.lines.join("\n"));
  assert.equal(log.count(FAILED), 0, log.lines.join("\n"));
});

Deno.test("accept: past the per-address limit a connection is closed at once; closing one lets a new one in", async () => {
  const { listener, clock, log, sessions, loop, nextLeave } = setup(2);
  const first = tcpFrom("127.0.0.1", 1);
  const second = tcpFrom("127.0.0.1", 2);
  for (const conn of [first, second]) {
    const started = sessions.started();
    listener.push(conn);
    assert.equal(await started, conn);
  }

  const third = tcpFrom("127.0.0.1", 3);
  const fourth = tcpFrom("127.0.0.1", 4);
  listener.push(third);
  listener.push(fourth);
  await third.closed.promise;
  await fourth.closed.promise;
  assert.equal(sessions.conns.length, 2, "no handshake for the connections past the limit");
  assert.ok(!first.isClosed && !second.isClosed, "the first two are still served");
  assert.equal(log.count(/127\.0\.0\.1.*refused/), 1, `rate-limited:\n${log.lines.join("\n")}`);

  // Another address has its own count.
  const other = tcpFrom("10.0.0.2", 1);
  let started = sessions.started();
  listener.push(other);
  assert.equal(await started, other);

  // Closing one of the first two frees its place.
  const left = nextLeave();
  first.close();
  assert.equal(await left, "127.0.0.1");
  const fifth = tcpFrom("127.0.0.1", 5);
  started = sessions.started();
  listener.push(fifth);
  assert.equal(await started, fifth);

  // After the rate limit's interval, a refusal is logged again, with how many went unlogged.
  clock.advance(60_000);
  const sixth = tcpFrom("127.0.0.1", 6);
  listener.push(sixth);
  await sixth.closed.promise;
  assert.equal(log.count(/refused/), 2, log.lines.join("\n"));
  assert.match(log.lines.findLast((line) => /refused/.test(line))!, /1 more/);

  for (const conn of [second, other, fifth]) conn.close();
  await loop.shutdown();
});

Deno.test("accept: Unix-socket connections have no address and no per-address limit", async () => {
  const { listener, sessions, loop } = setup(2);
  const conns = [unixConn(), unixConn(), unixConn(), unixConn()];
  for (const conn of conns) {
    const started = sessions.started();
    listener.push(conn);
    assert.equal(await started, conn);
  }
  assert.ok(conns.every((conn) => !conn.isClosed));
  for (const conn of conns) conn.close();
  await loop.shutdown();
});

Deno.test("client slots over one shared array count together, as the NBD threads' do", () => {
  const shared = new Int32Array(new SharedArrayBuffer(CLIENT_SLOTS_SHARED_BYTES));
  const one = clientSlots(4, shared, 2);
  const other = clientSlots(4, shared, 2);
  assert.ok(one.enterAddress("127.0.0.1"));
  assert.ok(other.enterAddress("127.0.0.1"));
  assert.ok(!one.enterAddress("127.0.0.1"), "the address's limit spans both");
  other.leaveAddress("127.0.0.1");
  assert.ok(one.enterAddress("127.0.0.1"), "and a place given back in one frees it in both");

  const entered = [one.enter(), other.enter(), one.enter(), other.enter()];
  assert.deepEqual(entered, [true, true, true, true]);
  assert.ok(!other.enter(), "the client limit spans both");
});
