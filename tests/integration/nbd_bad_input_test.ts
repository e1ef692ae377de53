/**
 * Hostile NBD input: garbage before the handshake, an oversized option, garbage and
 * a request with an unknown magic after it. Each gets a clear log line and only its
 * own connection closed; the server goes on serving others (nbdinfo still works).
 * Also the one handshake path real clients here never take: EXPORT_NAME without NO_ZEROES.
 */

import assert from "node:assert/strict";
import { waitUntil } from "../helpers/wait.ts";
import { readExact, writeAll } from "../../src/transport/byte_conn.ts";
import { newDisk, withExport } from "../helpers/spawn.ts";
import { missing, toolOk } from "../helpers/tools.ts";

const IHAVEOPT = 0x49484156454f5054n;

/** Connects, reads the 18-byte greeting, and sends client flags. */
async function greet(port: number, clientFlags: number): Promise<Deno.TcpConn> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  await readExact(conn, new Uint8Array(18));
  const flags = new DataView(new ArrayBuffer(4));
  flags.setUint32(0, clientFlags);
  await writeAll(conn, new Uint8Array(flags.buffer));
  return conn;
}

function option(code: number, length: number, data = new Uint8Array()): Uint8Array {
  const bytes = new Uint8Array(16 + data.length);
  const view = new DataView(bytes.buffer);
  view.setBigUint64(0, IHAVEOPT);
  view.setUint32(8, code);
  view.setUint32(12, length);
  bytes.set(data, 16);
  return bytes;
}

/** Resolves true when the server closes the connection within 5 s. */
async function closedByServer(conn: Deno.TcpConn): Promise<boolean> {
  const timer = setTimeout(() => conn.close(), 5000);
  try {
    const buffer = new Uint8Array(4096);
    for (;;) {
      const n = await conn.read(buffer);
      if (n === null) return true;
    }
  } catch {
    return false;
  } finally {
    clearTimeout(timer);
    try {
      conn.close();
    } catch {
      // closed
    }
  }
}

Deno.test({
  name: "bad NBD input closes only that connection, with a log line, and the server keeps serving",
  ignore: missing("nbdinfo"),
  fn: () =>
    withExport(
      "dst-nbd-bad-",
      (dir) => [...newDisk("4M")(dir), "--nbd", "127.0.0.1:0"],
      async (server) => {
        const port = Number(new URL(server.nbdUri!).port);

        const garbageFirst = await Deno.connect({ hostname: "127.0.0.1", port });
        await readExact(garbageFirst, new Uint8Array(18));
        await writeAll(garbageFirst, new TextEncoder().encode("GET / HTTP/1.1\r\n\r\n"));
        assert.ok(await closedByServer(garbageFirst), "garbage instead of client flags");

        const oversized = await greet(port, 3);
        await writeAll(oversized, option(6, 1_000_000));
        assert.ok(await closedByServer(oversized), "an oversized option");

        const badOptionMagic = await greet(port, 3);
        await writeAll(badOptionMagic, new Uint8Array(16).fill(0x42));
        assert.ok(await closedByServer(badOptionMagic), "an option without IHAVEOPT");

        const afterHandshake = await greet(port, 3); // NO_ZEROES: the EXPORT_NAME reply is 10 bytes
        await writeAll(afterHandshake, option(1, 0));
        await readExact(afterHandshake, new Uint8Array(10));
        await writeAll(afterHandshake, new Uint8Array(28).fill(0x99));
        assert.ok(await closedByServer(afterHandshake), "a request with an unknown magic");

        const info = JSON.parse(await toolOk("nbdinfo", ["--json", server.nbdUri!]));
        assert.equal(info.exports[0]["export-size"], 4 * 1024 * 1024, "still serving others");

        const log = server.log();
        assert.match(log, /NBD client flags 0x[0-9a-f]+ include unknown bits; closing/);
        assert.match(log, /NBD option INFO of 1000000 bytes > 8192; closing/);
        assert.match(log, /NBD option without the IHAVEOPT magic; closing/);
        assert.match(log, /NBD request with bad magic 0x99999999; closing this connection/);
      },
    ),
});

Deno.test("EXPORT_NAME from an old-style client (no NO_ZEROES) gets size, flags and 124 zero bytes, then serves", async () => {
  await withExport(
    "dst-nbd-zeroes-",
    (dir) => [...newDisk("4M")(dir), "--nbd", "127.0.0.1:0"],
    async (server) => {
      const port = Number(new URL(server.nbdUri!).port);
      const conn = await greet(port, 1); // FIXED_NEWSTYLE only
      try {
        await writeAll(conn, option(1, 0));
        const reply = new Uint8Array(10 + 124);
        await readExact(conn, reply);
        const view = new DataView(reply.buffer);
        assert.equal(view.getBigUint64(0), 4n * 1024n * 1024n);
        assert.ok((view.getUint16(8) & 1) !== 0, "HAS_FLAGS");
        assert.ok(reply.subarray(10).every((byte) => byte === 0), "124 zero bytes");
        // Transmission works: a 512-byte READ at 0 gets a simple reply and zeroes.
        const request = new DataView(new ArrayBuffer(28));
        request.setUint32(0, 0x25609513);
        request.setUint16(6, 0); // READ
        request.setUint32(12, 7); // cookie
        request.setUint32(24, 512);
        await writeAll(conn, new Uint8Array(request.buffer));
        const answer = new Uint8Array(16 + 512);
        await readExact(conn, answer);
        const answerView = new DataView(answer.buffer);
        assert.equal(answerView.getUint32(0), 0x67446698);
        assert.equal(answerView.getUint32(4), 0, "no error");
        assert.equal(answerView.getUint32(12), 7, "the cookie comes back");
        assert.ok(answer.subarray(16).every((byte) => byte === 0));
      } finally {
        conn.close();
      }
    },
  );
});

Deno.test("an NBD export name with control characters is logged escaped: it cannot forge a log line or drive the terminal", async () => {
  await withExport(
    "dst-nbd-name-",
    (dir) => [...newDisk("4M")(dir), "--nbd", "127.0.0.1:0"],
    async (server) => {
      const port = Number(new URL(server.nbdUri!).port);
      const conn = await greet(port, 3);
      const name = new TextEncoder().encode("x\n2026-01-01T00:00:00.000Z INFO forged\x1b[31m");
      await writeAll(conn, option(1, name.length, name)); // EXPORT_NAME of an unknown export
      assert.ok(await closedByServer(conn), "an unknown export name closes the connection");
      const escaped = /unknown export "x\\x0a2026-01-01T00:00:00\.000Z INFO forged\\x1b\[31m"/;
      // Log lines are written asynchronously: wait for it.
      await waitUntil(() => escaped.test(server.log()), "the log line", { timeoutMs: 10_000 });
      const log = server.log();
      assert.ok(!log.includes("\x1b"), "no escape character reaches the log");
      assert.ok(!/^2026-01-01T00:00:00\.000Z INFO forged/m.test(log), "no forged line");
    },
  );
});
