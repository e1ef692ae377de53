/**
 * The fault proxy against a small echo or sink server: it forwards byte for byte,
 * holds a cut connection's bytes and refuses new ones, keeps an abandoned held
 * connection open at the server until the late delivery, survives delivering to a
 * server that already left, and throttles.
 */

import assert from "node:assert/strict";
import { closeQuietly, readExact, writeAll } from "../../src/transport/byte_conn.ts";
import { assertSameBytes, concat, pattern, settleAll } from "./bytes.ts";
import { FaultProxy } from "./fault_proxy.ts";
import { TestServer } from "./test_server.ts";
import { randomBytes } from "./random_bytes.ts";
import { waitUntil } from "./wait.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

/** Runs `body` with a server (echo or sink), a proxy to it, and closes both after. */
async function withProxy(
  mode: "echo" | "sink",
  body: (proxy: FaultProxy, server: TestServer) => Promise<void>,
): Promise<void> {
  const server = new TestServer(mode === "echo");
  const proxy = FaultProxy.start(server.address);
  try {
    await body(proxy, server);
  } finally {
    await proxy.close();
    await server.close();
  }
}

/**
 * What a read on `conn` sees within `delayMs`: data, the end of the stream (FIN or
 * reset), or nothing; after "silent" the conn has been closed to end the read.
 */
async function firstEvent(conn: Deno.Conn, delayMs: number): Promise<"data" | "ended" | "silent"> {
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    closeQuietly(conn);
  }, delayMs);
  try {
    return (await conn.read(new Uint8Array(1024))) === null ? "ended" : "data";
  } catch {
    return timedOut ? "silent" : "ended";
  } finally {
    clearTimeout(timer);
  }
}

/** True when `promise` settles within `delayMs`; no timer is left running either way. */
async function settlesWithin(promise: Promise<unknown>, delayMs: number): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), delayMs);
  });
  try {
    return await Promise.race([promise.then(() => true, () => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Sends `bytes` and reads as many back, at the same time (an echo must not deadlock). */
async function roundTrip(conn: Deno.Conn, bytes: Uint8Array): Promise<Uint8Array> {
  const back = new Uint8Array(bytes.length);
  await settleAll([writeAll(conn, bytes), readExact(conn, back)]);
  return back;
}

Deno.test("fault proxy: forwards both directions byte for byte, and the FIN", async () => {
  await withProxy("echo", async (proxy, server) => {
    const client = await Deno.connect(proxy.address);
    try {
      const sent = randomBytes(300 * KiB);
      assertSameBytes(await roundTrip(client, sent), sent, "echo through the proxy");
      const side = await server.nextConnection();
      assertSameBytes(side.bytes(), sent, "what the server received");
      assert.deepEqual(proxy.stats(), { connections: 1, accepted: 1, refusedWhileCut: 0 });
      await client.closeWrite();
      await side.ended; // the client's FIN reached the server
      assert.equal(await firstEvent(client, 2000), "ended"); // and the server's came back
      await waitUntil(() => proxy.stats().connections === 0, "the pair to close", {
        timeoutMs: 2000,
        everyMs: 10,
      });
    } finally {
      closeQuietly(client);
    }
  });
});

Deno.test("fault proxy: close() twice is fine", async () => {
  const server = new TestServer(true);
  const proxy = FaultProxy.start(server.address);
  const client = await Deno.connect(proxy.address);
  await server.nextConnection();
  await proxy.close();
  await proxy.close();
  assert.equal(await firstEvent(client, 2000), "ended");
  closeQuietly(client);
  await server.close();
});

Deno.test("fault proxy: a cut holds what the client sends, refuses new connections, and heal lets new ones through", async () => {
  await withProxy("echo", async (proxy, server) => {
    const held = await Deno.connect(proxy.address);
    const side = await server.nextConnection();
    const before = pattern(0, 100);
    assertSameBytes(await roundTrip(held, before), before, "before the cut");

    proxy.cut();
    await writeAll(held, pattern(100, 5000));
    await proxy.whenHeldBytes(5000);
    assert.equal(proxy.heldBytes(), 5000);
    await side.conn.write(pattern(7, 10)); // the server speaks: the client must not hear it
    assert.equal(await firstEvent(held, 200), "silent");
    assert.equal(side.bytes().length, 100, "the server got nothing during the cut");

    const refused = await Deno.connect(proxy.address);
    assert.equal(await firstEvent(refused, 2000), "ended");
    closeQuietly(refused);
    assert.equal(proxy.stats().refusedWhileCut, 1);
    assert.equal(server.sides.length, 1, "a refused connection never reaches the server");

    proxy.heal();
    const fresh = await Deno.connect(proxy.address);
    try {
      const after = randomBytes(10 * KiB);
      assertSameBytes(await roundTrip(fresh, after), after, "after heal");
      assert.deepEqual(proxy.stats(), { connections: 2, accepted: 3, refusedWhileCut: 1 });
      assert.equal(proxy.heldBytes(), 5000, "the held connection stays held after heal");
    } finally {
      closeQuietly(fresh);
    }
  });
});

Deno.test("fault proxy: an abandoned held connection stays open at the server; deliverHeld sends its bytes late, in order", async () => {
  await withProxy("sink", async (proxy, server) => {
    const client = await Deno.connect(proxy.address);
    const side = await server.nextConnection();
    const before = pattern(0, 10);
    await writeAll(client, before);
    await side.whenReceived(before.length);

    proxy.cut();
    const late = randomBytes(200 * KiB);
    for (let at = 0; at < late.length; at += 30 * KiB) {
      await writeAll(client, late.subarray(at, at + 30 * KiB));
    }
    await proxy.whenHeldBytes(late.length);
    closeQuietly(client); // the client gives up on this connection
    assert.equal(await settlesWithin(side.ended, 200), false, "the server saw the client leave");
    assert.equal(proxy.stats().connections, 1);

    proxy.heal();
    assert.equal(await proxy.deliverHeld(), late.length);
    assert.equal(proxy.heldBytes(), 0);
    await side.ended; // the FIN comes after the late bytes
    assertSameBytes(side.bytes(), concat(before, late), "what the server received");
    await waitUntil(() => proxy.stats().connections === 0, "the pair to close", {
      timeoutMs: 2000,
      everyMs: 10,
    });
  });
});

Deno.test("fault proxy: deliverHeld to a connection the server already closed delivers 0 and does not throw", async () => {
  await withProxy("sink", async (proxy, server) => {
    const client = await Deno.connect(proxy.address);
    try {
      const side = await server.nextConnection();
      proxy.cut();
      await writeAll(client, pattern(0, 1000));
      await proxy.whenHeldBytes(1000);
      side.close();
      await waitUntil(() => proxy.stats().connections === 0, "the proxy to see the FIN", {
        timeoutMs: 2000,
        everyMs: 10,
      });
      assert.equal(await proxy.deliverHeld(), 0);
      assert.equal(proxy.heldBytes(), 0);
      assert.equal(await firstEvent(client, 200), "silent", "the client heard of the close");
    } finally {
      closeQuietly(client);
    }
  });
});

Deno.test("fault proxy: throttle(1 MiB/s) slows 512 KiB down and keeps it intact", async () => {
  await withProxy("echo", async (proxy) => {
    proxy.throttle(MiB);
    const client = await Deno.connect(proxy.address);
    try {
      const sent = randomBytes(512 * KiB);
      const startMs = performance.now();
      const back = await roundTrip(client, sent);
      const elapsedMs = performance.now() - startMs;
      assertSameBytes(back, sent, "echo through the throttled proxy");
      assert.ok(elapsedMs >= 400, `512 KiB at 1 MiB/s took only ${elapsedMs.toFixed(0)} ms`);
    } finally {
      closeQuietly(client);
    }
  });
});
