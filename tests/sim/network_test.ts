/**
 * The simulated network: bytes arrive in order after a random latency, reads may take
 * part of a chunk, close and process death end with EOF after what was in flight, a
 * cut client side leaves the server unaware (and its bytes may come late), partitions
 * hold bytes until they heal, dials are refused or time out, and a seeded run replays
 * to the same trace.
 */

import assert from "node:assert/strict";
import type { ByteConn } from "../../src/transport/byte_conn.ts";
import { SimNetwork } from "./network.ts";
import { prng } from "./prng.ts";
import { Scheduler } from "./scheduler.ts";

const LATENCY = { min: 5, max: 20 };

function world(seed = 1) {
  const sched = new Scheduler();
  const net = new SimNetwork(sched, { random: prng(seed), latencyMs: LATENCY });
  const server = sched.process("server");
  const client = sched.process("client");
  return { sched, net, server, client };
}

/** Connects `client` (on host "c") to a listener of `server` at leg0:1025. */
async function connected(seed = 1) {
  const w = world(seed);
  const listener = w.net.listen(w.server, "leg0:1025");
  const accepting = listener.accept();
  const dialing = w.net.dialer(w.client, "c")({ hostname: "leg0", port: 1025 });
  await w.sched.advance(LATENCY.max);
  return { ...w, listener, clientConn: await dialing, serverConn: await accepting };
}

/** Reads a connection to its end in the background, noting when each byte arrived. */
class Reader {
  readonly bytes: number[] = [];
  readonly times: number[] = [];
  eof = false;
  error: unknown = null;

  constructor(conn: ByteConn, now: () => number, size = 64) {
    void (async () => {
      const buffer = new Uint8Array(size);
      try {
        for (;;) {
          const n = await conn.read(buffer);
          if (n === null) break;
          for (const byte of buffer.subarray(0, n)) {
            this.bytes.push(byte);
            this.times.push(now());
          }
        }
        this.eof = true;
      } catch (error) {
        this.error = error;
      }
    })();
  }
}

const encode = (text: string) => new TextEncoder().encode(text);
const text = (bytes: number[]) => new TextDecoder().decode(new Uint8Array(bytes));

Deno.test("bytes arrive in order, each write after a latency in [min, max], never before an earlier one", async () => {
  const { sched, clientConn, serverConn } = await connected();
  const reader = new Reader(serverConn, () => sched.nowMs());
  const sentAt: number[] = [];
  for (let i = 0; i < 200; i++) {
    sentAt.push(sched.nowMs());
    assert.equal(await clientConn.write(new Uint8Array([i])), 1);
    await sched.advance(i % 3); // some writes share a millisecond, some do not
  }
  await sched.advance(LATENCY.max);
  assert.deepEqual(reader.bytes, [...Array(200).keys()]);
  const delays = reader.times.map((t, i) => t - sentAt[i]!);
  assert.ok(delays.every((d) => d >= LATENCY.min), "no byte arrives before the minimum latency");
  assert.ok(delays.some((d) => d > LATENCY.min), "latency varies");
  assert.ok(reader.times.every((t, i) => i === 0 || t >= reader.times[i - 1]!));
  // A write's own delay is at most max; only waiting behind an earlier chunk makes it later.
  assert.ok(delays[0]! <= LATENCY.max);
  assert.equal(reader.eof, false);
});

Deno.test("a read takes part of a chunk and leaves the rest; writes copy the caller's buffer", async () => {
  const { sched, clientConn, serverConn } = await connected();
  const buffer = encode("0123456789");
  await clientConn.write(buffer);
  buffer.fill(0); // the caller reuses its buffer at once
  await clientConn.write(encode("ab"));
  await sched.advance(2 * LATENCY.max);
  const into = new Uint8Array(4);
  const reads: string[] = [];
  for (let i = 0; i < 3; i++) {
    const n = await serverConn.read(into);
    reads.push(new TextDecoder().decode(into.subarray(0, n!)));
  }
  // A read may span chunks, as a TCP read spans segments.
  assert.deepEqual(reads, ["0123", "4567", "89ab"]);
  assert.equal(await serverConn.read(new Uint8Array(0)), 0);
});

Deno.test("close: the peer reads what was in flight, then EOF; later writes reject; closing twice is harmless", async () => {
  const { sched, net, clientConn, serverConn } = await connected();
  const clientReader = new Reader(clientConn, () => sched.nowMs());
  const serverReader = new Reader(serverConn, () => sched.nowMs());
  await clientConn.write(encode("last words"));
  clientConn.close();
  clientConn.close();
  await assert.rejects(clientConn.write(encode("more")), Deno.errors.BadResource);
  await sched.settle();
  assert.equal(clientReader.eof, true, "the closed side's pending read ends at once");
  assert.equal(serverReader.eof, false);
  await sched.advance(LATENCY.max);
  assert.equal(text(serverReader.bytes), "last words");
  assert.equal(serverReader.eof, true);
  assert.equal(net.openConnections("leg0:1025"), 1, "the server side is still open");
  assert.equal(await serverConn.write(encode("into the void")), 13);
  serverConn.close();
  assert.equal(net.openConnections(), 0);
  assert.equal(sched.pendingTimers, 0, "nothing is left in flight to a closed end");
});

Deno.test("cutClientSide(late=false): the client ends at once, the server sees in-flight bytes then EOF", async () => {
  const { sched, net, clientConn, serverConn } = await connected();
  const clientReader = new Reader(clientConn, () => sched.nowMs());
  const serverReader = new Reader(serverConn, () => sched.nowMs());
  await clientConn.write(encode("in flight"));
  const cutAt = sched.nowMs();
  assert.equal(net.cutClientSide("leg0:1025", { late: false }), 1);
  assert.equal(net.cutClientSide("leg0:1025", { late: false }), 0, "already cut");
  await sched.settle();
  assert.equal(clientReader.eof, true);
  await assert.rejects(clientConn.write(encode("x")), Deno.errors.ConnectionReset);
  assert.equal(await serverConn.write(encode("reply")), 5, "the server is unaware");
  await sched.advance(LATENCY.max);
  assert.equal(text(serverReader.bytes), "in flight");
  assert.equal(serverReader.eof, true);
  assert.ok(serverReader.times.every((t) => t - cutAt <= LATENCY.max));
  assert.deepEqual(clientReader.bytes, [], "the reply went nowhere");
});

Deno.test("cutClientSide(late=true): the server side stays open until deliverLate() brings the held bytes", async () => {
  const { sched, net, clientConn, serverConn } = await connected();
  const serverReader = new Reader(serverConn, () => sched.nowMs());
  await clientConn.write(encode("old "));
  await clientConn.write(encode("request"));
  assert.equal(net.cutClientSide("leg0:1025", { late: true }), 1);
  await sched.advance(10_000);
  assert.deepEqual(serverReader.bytes, []);
  assert.equal(serverReader.eof, false);
  assert.equal(net.openConnections("leg0:1025"), 1);
  const releasedAt = sched.nowMs();
  net.deliverLate();
  await sched.advance(2 * LATENCY.max);
  assert.equal(text(serverReader.bytes), "old request");
  assert.equal(serverReader.eof, true);
  assert.ok(serverReader.times.every((t) => t - releasedAt >= LATENCY.min));
  serverConn.close();
  assert.equal(net.openConnections(), 0);
});

Deno.test("a partition holds bytes both ways and new dials time out; healing delivers them in order", async () => {
  const { sched, net, listener, clientConn, serverConn } = await connected();
  const serverReader = new Reader(serverConn, () => sched.nowMs());
  const clientReader = new Reader(clientConn, () => sched.nowMs());
  await clientConn.write(encode("before "));
  net.partition("leg0", true);
  await clientConn.write(encode("during"));
  await serverConn.write(encode("reply"));
  const dialStart = sched.nowMs();
  let dialError: unknown = null;
  net.dialer(sched.process("other"), "d")({ hostname: "leg0", port: 1025 }).catch((e) =>
    dialError = e
  );
  await sched.advance(5_000);
  assert.deepEqual(serverReader.bytes, []);
  assert.deepEqual(clientReader.bytes, []);
  assert.ok(dialError instanceof Deno.errors.TimedOut);
  assert.equal(dialStart + 1000 <= sched.nowMs(), true);
  net.partition("leg0", false);
  await sched.advance(3 * LATENCY.max);
  assert.equal(text(serverReader.bytes), "before during");
  assert.equal(text(clientReader.bytes), "reply");
  const accepting = listener.accept();
  const dialing = net.dialer(sched.process("late"), "d")({ hostname: "leg0", port: 1025 });
  await sched.advance(LATENCY.max);
  assert.ok(await dialing);
  assert.equal((await accepting).remoteAddr.transport, "tcp");
});

Deno.test("a dial into a partition fails after connectTimeoutMs exactly", async () => {
  const sched = new Scheduler();
  const net = new SimNetwork(sched, {
    random: prng(3),
    latencyMs: LATENCY,
    connectTimeoutMs: 250,
  });
  net.listen(sched.process("server"), "leg0:1025");
  net.partition("c", true); // the dialing side's host this time
  let failedAt = -1;
  net.dialer(sched.process("client"), "c")({ hostname: "leg0", port: 1025 }).catch(() =>
    failedAt = sched.nowMs()
  );
  await sched.runUntil(() => failedAt >= 0, 10_000);
  assert.equal(failedAt, 250);
});

Deno.test("a dial with nothing listening is refused after one latency; addresses are taken once", async () => {
  const { sched, net, server, client } = world();
  const dial = net.dialer(client, "c");
  let refusedAt = -1;
  await Promise.all([
    assert.rejects(dial({ hostname: "leg0", port: 1025 }), (e: Error) => {
      refusedAt = sched.nowMs();
      return e instanceof Deno.errors.ConnectionRefused && /connection refused/.test(e.message);
    }),
    sched.advance(LATENCY.max),
  ]);
  assert.ok(refusedAt >= LATENCY.min && refusedAt <= LATENCY.max);
  const listener = net.listen(server, "leg0:1025");
  assert.deepEqual(listener.addr, { transport: "tcp", hostname: "leg0", port: 1025 });
  assert.throws(() => net.listen(server, "leg0:1025"), Deno.errors.AddrInUse);
  const pending = listener.accept();
  listener.close();
  listener.close();
  await assert.rejects(pending);
  await assert.rejects(listener.accept());
  const refused = assert.rejects(dial({ hostname: "leg0", port: 1025 }), /refused/);
  await sched.advance(LATENCY.max);
  await refused;
  net.listen(server, "leg0:1025"); // free again
});

Deno.test("killing the server process closes its connections and its listener", async () => {
  const { sched, net, server, client, listener, clientConn, serverConn } = await connected();
  const clientReader = new Reader(clientConn, () => sched.nowMs());
  const nextAccept = listener.accept();
  let serverTimerFired = false;
  sched.clock(server).after(5, () => serverTimerFired = true);
  await serverConn.write(encode("dying words"));
  server.kill();
  await assert.rejects(nextAccept);
  await assert.rejects(serverConn.write(encode("x")));
  assert.equal(await serverConn.read(new Uint8Array(4)), null);
  await sched.advance(LATENCY.max);
  assert.equal(text(clientReader.bytes), "dying words");
  assert.equal(clientReader.eof, true);
  assert.equal(serverTimerFired, false);
  const refused = assert.rejects(
    net.dialer(client, "c")({ hostname: "leg0", port: 1025 }),
    Deno.errors.ConnectionRefused,
  );
  await sched.advance(LATENCY.max);
  await refused;
  net.listen(sched.process("restarted"), "leg0:1025");
});

Deno.test("killing the client process ends its side: the server reads EOF after in-flight bytes", async () => {
  const { sched, net, client, clientConn, serverConn } = await connected();
  const serverReader = new Reader(serverConn, () => sched.nowMs());
  await clientConn.write(encode("bye"));
  client.kill();
  await assert.rejects(clientConn.write(encode("x")));
  await assert.rejects(net.dialer(client, "c")({ hostname: "leg0", port: 1025 }));
  await sched.advance(LATENCY.max);
  assert.equal(text(serverReader.bytes), "bye");
  assert.equal(serverReader.eof, true);
  assert.equal(net.openConnections(), 1);
  serverConn.close();
  assert.equal(net.openConnections(), 0);
});

/** A small scripted world: an echo server, three clients writing random sizes, and faults. */
async function scenario(seed: number): Promise<string[]> {
  const sched = new Scheduler();
  const random = prng(seed);
  const net = new SimNetwork(sched, { random, latencyMs: { min: 1, max: 30 } });
  const trace: string[] = [];
  const note = (event: string) => trace.push(`${sched.nowMs()} ${event}`);
  const server = sched.process("server");
  const listener = net.listen(server, "leg0:1025");
  void (async () => {
    for (let id = 0;; id++) {
      const conn = await listener.accept().catch(() => null);
      if (conn === null) return note("listener stopped");
      note(`accepted ${id}`);
      void (async () => {
        const buffer = new Uint8Array(7);
        for (;;) {
          const n = await conn.read(buffer);
          if (n === null) return note(`server ${id} eof`);
          note(`server ${id} got ${n}`);
          await conn.write(buffer.subarray(0, n)).catch(() => note(`server ${id} write failed`));
        }
      })();
    }
  })();
  for (let c = 0; c < 3; c++) {
    const proc = sched.process(`client${c}`);
    const clock = sched.clock(proc);
    void (async () => {
      const conn = await net.dialer(proc, `c${c}`)({ hostname: "leg0", port: 1025 });
      note(`client ${c} connected`);
      void (async () => {
        const buffer = new Uint8Array(16);
        for (;;) {
          const n = await conn.read(buffer);
          if (n === null) return note(`client ${c} eof`);
          note(`client ${c} echo ${n}`);
        }
      })();
      clock.every(10, () => {
        const size = 1 + Math.floor(random() * 20);
        conn.write(new Uint8Array(size)).then(
          () => note(`client ${c} wrote ${size}`),
          () => note(`client ${c} write failed`),
        );
      });
    })();
  }
  sched.at(55, () => net.partition("c1", true));
  sched.at(90, () => net.partition("c1", false));
  sched.at(120, () => note(`cut ${net.cutClientSide("leg0:1025", { late: true })}`));
  sched.at(160, () => net.deliverLate());
  sched.at(200, () => server.kill());
  await sched.advance(300);
  note(`open ${net.openConnections()} timers ${sched.pendingTimers}`);
  return trace;
}

Deno.test("the same seed gives the same trace; another seed gives another", async () => {
  const first = await scenario(7);
  const second = await scenario(7);
  assert.ok(first.length > 50, `a busy trace (${first.length} events)`);
  assert.deepEqual(second, first);
  assert.notDeepEqual(await scenario(8), first);
});
