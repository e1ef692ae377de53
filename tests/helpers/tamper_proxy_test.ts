/**
 * The tamper proxy against a small echo or sink server: it forwards byte for byte;
 * each action (flip, duplicate, drop, truncate) changes exactly the bytes it names,
 * wherever reads split the stream; tampers go to the next connection or to all until
 * disarmed; recordings hold exactly what each side sent; a replay reaches the server
 * again and reports its reply and its close.
 */

import assert from "node:assert/strict";
import { closeQuietly, readExact, writeAll } from "../../src/transport/byte_conn.ts";
import { assertSameBytes, concat, pattern, settleAll } from "./bytes.ts";
import { randomBytes } from "./random_bytes.ts";
import {
  containsBytes,
  StreamTamper,
  type Tamper,
  type TamperKind,
  TamperProxy,
} from "./tamper_proxy.ts";
import { TestServer } from "./test_server.ts";
import { waitUntil } from "./wait.ts";

const KiB = 1024;
const NO_TAMPERS = { flip: 0, duplicate: 0, drop: 0, truncate: 0 };

/** Runs `body` with a server (echo or sink), a proxy to it, and closes both after. */
async function withProxy(
  mode: "echo" | "sink",
  options: Parameters<typeof TamperProxy.start>[1],
  body: (proxy: TamperProxy, server: TestServer) => Promise<void>,
): Promise<void> {
  const server = new TestServer(mode === "echo");
  const proxy = TamperProxy.start(server.address, options);
  try {
    await body(proxy, server);
  } finally {
    await proxy.close();
    await server.close();
  }
}

/** Everything `conn` receives until its peer ends it (FIN or reset), then closes it. */
async function readToEnd(conn: Deno.Conn, timeoutMs = 2000): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    closeQuietly(conn);
  }, timeoutMs);
  try {
    const buffer = new Uint8Array(64 * KiB);
    while (true) {
      const n = await conn.read(buffer);
      if (n === null) break;
      chunks.push(buffer.slice(0, n));
    }
  } catch {
    // A reset ends the stream too.
  } finally {
    clearTimeout(timer);
    closeQuietly(conn);
  }
  if (timedOut) throw new Error(`the peer did not end the connection within ${timeoutMs} ms`);
  return concat(...chunks);
}

/** Connects through the proxy, sends `bytes` and a FIN, and returns all that came back. */
async function exchange(proxy: TamperProxy, bytes: Uint8Array): Promise<Uint8Array> {
  const conn = await Deno.connect(proxy.address);
  const back = readToEnd(conn);
  await settleAll([writeAll(conn, bytes).then(() => conn.closeWrite()), back]);
  return await back;
}

/** Sends `bytes` and reads as many back, at the same time (an echo must not deadlock). */
async function roundTrip(conn: Deno.Conn, bytes: Uint8Array): Promise<Uint8Array> {
  const back = new Uint8Array(bytes.length);
  await settleAll([writeAll(conn, bytes), readExact(conn, back)]);
  return back;
}

/** `bytes` with the byte at `at` XORed with `mask`, as a copy. */
function flipped(bytes: Uint8Array, at: number, mask = 0x01): Uint8Array {
  const copy = bytes.slice();
  copy[at]! ^= mask;
  return copy;
}

Deno.test("tamper proxy: forwards both directions byte for byte, and the FIN", async () => {
  await withProxy("echo", {}, async (proxy, server) => {
    const sent = randomBytes(300 * KiB);
    assertSameBytes(await exchange(proxy, sent), sent, "echo through the proxy");
    const side = await server.nextConnection();
    await side.ended;
    assertSameBytes(side.bytes(), sent, "what the server received");
    await waitUntil(() => proxy.stats().connections === 0, "the link to close", {
      timeoutMs: 2000,
      everyMs: 10,
    });
    assert.deepEqual(proxy.stats(), { accepted: 1, connections: 0, applied: NO_TAMPERS });
  });
});

Deno.test("tamper proxy: close() twice is fine and ends the client's connection", async () => {
  const server = new TestServer(true);
  const proxy = TamperProxy.start(server.address);
  const client = await Deno.connect(proxy.address);
  await server.nextConnection();
  await proxy.close();
  await proxy.close();
  assert.equal((await readToEnd(client)).length, 0);
  await server.close();
});

Deno.test("StreamTamper: each action changes exactly its bytes, however reads split the stream", () => {
  const stream = pattern(0, 40);
  const combined = flipped(stream, 30);
  const cases: {
    name: string;
    tampers: Omit<Tamper, "direction">[];
    expected: Uint8Array;
    applied: TamperKind[];
    ended: boolean;
  }[] = [
    {
      name: "flip 0x01 at 13",
      tampers: [{ afterBytes: 13, action: { kind: "flip" } }],
      expected: flipped(stream, 13),
      applied: ["flip"],
      ended: false,
    },
    {
      name: "flip 0x80 at 0 and 0x01 at 39",
      tampers: [
        { afterBytes: 0, action: { kind: "flip", mask: 0x80 } },
        { afterBytes: 39, action: { kind: "flip" } },
      ],
      expected: flipped(flipped(stream, 0, 0x80), 39),
      applied: ["flip", "flip"],
      ended: false,
    },
    {
      name: "duplicate [10, 20)",
      tampers: [{ afterBytes: 10, action: { kind: "duplicate", lengthBytes: 10 } }],
      expected: concat(pattern(0, 20), pattern(10, 10), pattern(20, 20)),
      applied: ["duplicate"],
      ended: false,
    },
    {
      name: "duplicate [30, 40), the end of the stream",
      tampers: [{ afterBytes: 30, action: { kind: "duplicate", lengthBytes: 10 } }],
      expected: concat(stream, pattern(30, 10)),
      applied: ["duplicate"],
      ended: false,
    },
    {
      name: "duplicate [35, 45), which the stream never completes",
      tampers: [{ afterBytes: 35, action: { kind: "duplicate", lengthBytes: 10 } }],
      expected: stream,
      applied: [],
      ended: false,
    },
    {
      name: "drop [10, 20)",
      tampers: [{ afterBytes: 10, action: { kind: "drop", lengthBytes: 10 } }],
      expected: concat(pattern(0, 10), pattern(20, 20)),
      applied: ["drop"],
      ended: false,
    },
    {
      name: "truncate at 25",
      tampers: [{ afterBytes: 25, action: { kind: "truncate" } }],
      expected: pattern(0, 25),
      applied: ["truncate"],
      ended: true,
    },
    {
      name: "duplicate [10, 14) repeats a flip at 12 made in it",
      tampers: [
        { afterBytes: 10, action: { kind: "duplicate", lengthBytes: 4 } },
        { afterBytes: 12, action: { kind: "flip" } },
      ],
      expected: concat(
        flipped(stream, 12).subarray(0, 14),
        flipped(stream, 12).subarray(10, 14),
        stream.subarray(14),
      ),
      applied: ["duplicate", "flip"],
      ended: false,
    },
    {
      name: "truncate at 0",
      tampers: [{ afterBytes: 0, action: { kind: "truncate" } }],
      expected: new Uint8Array(0),
      applied: ["truncate"],
      ended: true,
    },
    {
      name: "drop [5, 8), duplicate [20, 24), flip at 30, truncate at 35",
      tampers: [
        { afterBytes: 35, action: { kind: "truncate" } },
        { afterBytes: 30, action: { kind: "flip" } },
        { afterBytes: 20, action: { kind: "duplicate", lengthBytes: 4 } },
        { afterBytes: 5, action: { kind: "drop", lengthBytes: 3 } },
      ],
      expected: concat(
        combined.subarray(0, 5),
        combined.subarray(8, 24),
        combined.subarray(20, 24),
        combined.subarray(24, 35),
      ),
      applied: ["drop", "duplicate", "flip", "truncate"],
      ended: true,
    },
  ];
  for (const { name, tampers, expected, applied, ended } of cases) {
    // Every split of the stream into three reads (empty ones included).
    for (let first = 0; first <= stream.length; first++) {
      for (let second = first; second <= stream.length; second++) {
        const kinds: TamperKind[] = [];
        const tamper = new StreamTamper(
          tampers.map((tamper) => ({ ...tamper, direction: "toServer" })),
          (kind) => kinds.push(kind),
        );
        const parts: Uint8Array[] = [];
        for (const [from, to] of [[0, first], [first, second], [second, stream.length]]) {
          if (tamper.ended) break;
          parts.push(...tamper.rewrite(stream.slice(from, to)));
        }
        const what = `${name}, reads split at ${first} and ${second}`;
        assertSameBytes(concat(...parts), expected, what);
        assert.deepEqual(kinds.sort(), applied, what);
        assert.equal(tamper.ended, ended, what);
      }
    }
  }
});

Deno.test("tamper proxy: flip changes the named bits of the next connection only", async () => {
  await withProxy("sink", { readBytesMax: 8 }, async (proxy, server) => {
    proxy.tamper({ direction: "toServer", afterBytes: 7, action: { kind: "flip" } });
    proxy.tamper({ direction: "toServer", afterBytes: 8, action: { kind: "flip", mask: 0x80 } });
    const sent = pattern(0, 40);
    assert.equal((await exchange(proxy, sent)).length, 0);
    const tampered = await server.nextConnection();
    await tampered.ended;
    assertSameBytes(tampered.bytes(), flipped(flipped(sent, 7), 8, 0x80), "the first connection");

    assert.equal((await exchange(proxy, sent)).length, 0);
    const clean = await server.nextConnection();
    await clean.ended;
    assertSameBytes(clean.bytes(), sent, "the second connection");
    assert.deepEqual(proxy.stats().applied, { ...NO_TAMPERS, flip: 2 });
  });
});

Deno.test("tamper proxy: duplicate sends a range toward the client again, across reads", async () => {
  await withProxy("echo", { readBytesMax: 8 }, async (proxy, server) => {
    proxy.tamper({
      direction: "toClient",
      afterBytes: 10,
      action: { kind: "duplicate", lengthBytes: 20 },
    });
    const sent = pattern(0, 100);
    const back = await exchange(proxy, sent);
    assertSameBytes(back, concat(pattern(0, 30), pattern(10, 20), pattern(30, 70)), "echo");
    const side = await server.nextConnection();
    await side.ended;
    assertSameBytes(side.bytes(), sent, "what the server received");
    assert.deepEqual(proxy.stats().applied, { ...NO_TAMPERS, duplicate: 1 });
  });
});

Deno.test("tamper proxy: drop removes a range toward the server, across reads", async () => {
  await withProxy("sink", { readBytesMax: 8 }, async (proxy, server) => {
    proxy.tamper({
      direction: "toServer",
      afterBytes: 10,
      action: { kind: "drop", lengthBytes: 20 },
    });
    assert.equal((await exchange(proxy, pattern(0, 100))).length, 0);
    const side = await server.nextConnection();
    await side.ended;
    assertSameBytes(side.bytes(), concat(pattern(0, 10), pattern(30, 70)), "what the server got");
    assert.deepEqual(proxy.stats().applied, { ...NO_TAMPERS, drop: 1 });
  });
});

Deno.test("tamper proxy: truncate toward the server forwards N bytes, then closes both sides", async () => {
  await withProxy("sink", {}, async (proxy, server) => {
    proxy.tamper({ direction: "toServer", afterBytes: 40, action: { kind: "truncate" } });
    const client = await Deno.connect(proxy.address);
    await writeAll(client, pattern(0, 100)); // no FIN: the proxy must close on its own
    assert.equal((await readToEnd(client)).length, 0);
    const side = await server.nextConnection();
    await side.ended;
    assertSameBytes(side.bytes(), pattern(0, 40), "what the server received");
    assert.deepEqual(proxy.stats().applied, { ...NO_TAMPERS, truncate: 1 });
  });
});

Deno.test("tamper proxy: truncate toward the client forwards N bytes, then closes both sides", async () => {
  await withProxy("echo", {}, async (proxy, server) => {
    proxy.tamper({ direction: "toClient", afterBytes: 30, action: { kind: "truncate" } });
    const client = await Deno.connect(proxy.address);
    await writeAll(client, pattern(0, 100));
    assertSameBytes(await readToEnd(client), pattern(0, 30), "what the client received");
    await (await server.nextConnection()).ended;
    assert.deepEqual(proxy.stats().applied, { ...NO_TAMPERS, truncate: 1 });
  });
});

Deno.test("tamper proxy: connections: all tampers with every connection until disarm()", async () => {
  await withProxy("sink", {}, async (proxy, server) => {
    proxy.tamper({
      direction: "toServer",
      afterBytes: 2,
      action: { kind: "flip", mask: 0xff },
      connections: "all",
    });
    const sent = pattern(0, 4);
    for (const expected of [flipped(sent, 2, 0xff), flipped(sent, 2, 0xff), sent]) {
      if (proxy.stats().accepted === 2) proxy.disarm();
      await exchange(proxy, sent);
      const side = await server.nextConnection();
      await side.ended;
      assertSameBytes(side.bytes(), expected, `connection ${proxy.stats().accepted}`);
    }
    assert.deepEqual(proxy.stats().applied, { ...NO_TAMPERS, flip: 2 });
  });
});

Deno.test("tamper proxy: recordings hold what each side sent, up to the limit", async () => {
  const secret = new TextEncoder().encode("the key is 0123456789abcdef");
  await withProxy("echo", { record: true }, async (proxy) => {
    const sent = concat(randomBytes(5 * KiB), secret, randomBytes(3 * KiB));
    await exchange(proxy, sent);
    const [recording, ...others] = proxy.recordings();
    assert.equal(others.length, 0);
    assertSameBytes(recording!.toServer, sent, "toServer");
    assertSameBytes(recording!.toClient, sent, "toClient");
    assert.equal(recording!.complete, true);
    assert.equal(containsBytes(recording!.toServer, secret), true);
    assert.equal(containsBytes(recording!.toServer, secret.map((byte) => byte ^ 1)), false);
  });
  await withProxy("echo", { record: true, recordLimitBytes: 10 }, async (proxy) => {
    await exchange(proxy, pattern(0, 100));
    const [recording] = proxy.recordings();
    assertSameBytes(recording!.toServer, pattern(0, 10), "toServer, limited");
    assertSameBytes(recording!.toClient, pattern(0, 10), "toClient, limited");
    assert.equal(recording!.complete, false);
  });
  await withProxy("echo", {}, (proxy) => {
    assert.throws(() => proxy.recordings(), /without record: true/);
    return Promise.resolve();
  });
});

Deno.test("containsBytes() finds a needle anywhere, and only a whole one", () => {
  const haystack = pattern(0, 10);
  assert.equal(containsBytes(haystack, pattern(0, 3)), true);
  assert.equal(containsBytes(haystack, pattern(7, 3)), true);
  assert.equal(containsBytes(haystack, pattern(4, 2)), true);
  assert.equal(containsBytes(haystack, pattern(8, 3)), false, "runs past the end");
  assert.equal(containsBytes(haystack, Uint8Array.of(3, 5)), false);
  assert.equal(containsBytes(Uint8Array.of(1, 1, 2), Uint8Array.of(1, 2)), true);
  assert.equal(containsBytes(haystack, new Uint8Array(0)), true);
  assert.equal(containsBytes(new Uint8Array(0), Uint8Array.of(0)), false);
});

Deno.test("tamper proxy: replay sends a recording again in its original reads, paced, and reports the reply", async () => {
  await withProxy("echo", { record: true }, async (proxy, server) => {
    const pieces = [pattern(0, 100), pattern(100, 200), pattern(50, 50)];
    const client = await Deno.connect(proxy.address);
    for (const piece of pieces) assertSameBytes(await roundTrip(client, piece), piece, "echo");
    closeQuietly(client);
    const [recording] = proxy.recordings();
    assert.deepEqual(recording!.toServerChunkBytes, [100, 200, 50]);

    const startMs = performance.now();
    const result = await proxy.replay(recording!, {
      chunking: "original",
      paceMs: 50,
      listenMs: 300,
    });
    const elapsedMs = performance.now() - startMs;
    const all = concat(...pieces);
    assertSameBytes(result.received, all, "the echo of the replay");
    assert.equal(result.sentBytes, all.length);
    assert.equal(result.serverEnded, null, "the echo server keeps the connection open");
    assert.equal(result.serverEndedAfterMs, null);
    assert.ok(elapsedMs >= 400, `two 50 ms paces and 300 ms listening took ${elapsedMs} ms`);
    await server.nextConnection();
    const replayed = await server.nextConnection();
    await replayed.ended; // the replay closed its connection
    assertSameBytes(replayed.bytes(), all, "what the server received from the replay");
    assert.equal(proxy.stats().accepted, 1, "the replay does not go through the proxy");
  });
});

Deno.test("tamper proxy: replay reports the server's reply and close", async () => {
  await withProxy("sink", { record: true }, async (proxy, server) => {
    const sent = pattern(0, 50);
    await exchange(proxy, sent);
    await server.nextConnection();
    const replaying = proxy.replay(proxy.recordings()[0]!, { listenMs: 2000 });
    const side = await server.nextConnection();
    await side.whenReceived(sent.length);
    await writeAll(side.conn, new TextEncoder().encode("refused"));
    side.close();
    const result = await replaying;
    assertSameBytes(result.received, new TextEncoder().encode("refused"), "the reply");
    assert.equal(result.sentBytes, sent.length);
    assert.equal(result.serverEnded, "fin");
    assert.ok(result.serverEndedAfterMs !== null && result.serverEndedAfterMs < 2000);
    assertSameBytes(side.bytes(), sent, "what the server received from the replay");
  });
});

Deno.test("tamper proxy: tamper() refuses offsets, lengths and masks out of range", async () => {
  await withProxy("sink", {}, async (proxy) => {
    const direction = "toServer";
    assert.throws(
      () => proxy.tamper({ direction, afterBytes: -1, action: { kind: "truncate" } }),
      RangeError,
    );
    assert.throws(
      () => proxy.tamper({ direction, afterBytes: 1.5, action: { kind: "flip" } }),
      RangeError,
    );
    assert.throws(
      () => proxy.tamper({ direction, afterBytes: 0, action: { kind: "drop", lengthBytes: 0 } }),
      RangeError,
    );
    for (const mask of [0, 256]) {
      assert.throws(
        () => proxy.tamper({ direction, afterBytes: 0, action: { kind: "flip", mask } }),
        RangeError,
      );
    }
    await exchange(proxy, pattern(0, 10));
    assert.deepEqual(proxy.stats().applied, NO_TAMPERS, "nothing refused was armed");
  });
});
