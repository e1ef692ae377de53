/**
 * RequestLoop's close, through both servers that use it.
 *
 * In one process, on real sockets on loopback: a server that closes a connection
 * because of a frame it cannot trust first answers every request it had dispatched
 * (protocol README, "Invalid input"), and those answers must reach the client also
 * when the client had sent more after the bad frame, as a client pipelining requests
 * does. Closing a socket with bytes unread makes the kernel reset the connection, and
 * the reset drops what the client had not read yet. Found by the frame fuzzing
 * (tests/property/*_frame_fuzz_test.ts).
 *
 * On a scripted connection and a clock the test moves: the time limits of a connection
 * that holds a client place and does nothing with it. A DST connection idle for
 * CONNECTION_IDLE_MS is closed (an NBD one is not); a frame not whole FRAME_TIMEOUT_MS
 * after its first byte closes the connection, over either protocol; so does a send
 * queue that made no progress for SEND_STALL_MS, once what was dispatched has finished.
 */

import assert from "node:assert/strict";
import {
  CLIENT_PING_MS_MAX,
  CONNECTION_CHECK_MS,
  CONNECTION_IDLE_MS,
  FRAME_TIMEOUT_MS,
  SEND_STALL_MS,
} from "../constants.ts";
import { MemoryDevice } from "../device/memory_device.ts";
import { BufferPool } from "../lib/buffer_pool.ts";
import { type Logger, silentLogger as quiet } from "../lib/log.ts";
import { NbdServer } from "../nbd/server.ts";
import { NbdConnection } from "../nbd/transmission.ts";
import { Command } from "../protocol/mod.ts";
import { ExportConnection } from "../server/export_connection.ts";
import { Exporter } from "../server/exporter.ts";
import { type ByteConn, closeQuietly, readExact, writeAll } from "./byte_conn.ts";
import type { RequestLoop } from "./request_loop.ts";
import { concat } from "../../tests/helpers/bytes.ts";
import { readToEnd, within } from "../../tests/helpers/frame_fuzz.ts";
import { standaloneExportContext } from "../../tests/helpers/export_context.ts";
import { ManualClock } from "../../tests/helpers/manual_clock.ts";
import { RawClient } from "../../tests/helpers/raw_client.ts";

const READS = 100;
const READ_BYTES = 64 * 1024;

/**
 * Sends `requests` and a frame with a bad magic, then more bytes a moment later (the
 * server has stopped reading by then), and returns everything the server sent until
 * it closed.
 */
async function sendThenBadFrame(conn: Deno.Conn, requests: Uint8Array): Promise<Uint8Array> {
  await writeAll(conn, concat(requests, new Uint8Array(32).fill(0x42)));
  await new Promise((resolve) => setTimeout(resolve, 50));
  await writeAll(conn, new Uint8Array(100_000)).catch(() => {});
  return (await readToEnd(conn)).bytes; // up to the close, or a reset
}

/** Checks that `output` is READS replies of `replyBytes` each. */
function assertAllReplies(output: Uint8Array, replyBytes: number): void {
  assert.equal(
    output.length,
    READS * replyBytes,
    `${Math.floor(output.length / replyBytes)} of ${READS} replies arrived`,
  );
}

Deno.test("DST: the replies to requests before a frame that cannot be trusted all arrive, though the client sent more", async () => {
  const exporter = Exporter.start(new MemoryDevice(1024 * 1024), {
    listen: { hostname: "127.0.0.1", port: 0 },
    log: quiet,
  });
  const client = await RawClient.connect(exporter.address);
  try {
    const requests = concat(
      ...Array.from({ length: READS }, (_, i) =>
        RawClient.frame({
          command: Command.READ,
          flags: 0,
          txId: i + 1,
          offset: 0,
          length: READ_BYTES,
          payloadLength: 0,
        })),
    );
    const output = await within(
      10_000,
      "the export's close",
      sendThenBadFrame(client.conn as Deno.Conn, requests),
    );
    assertAllReplies(output, 24 + READ_BYTES);
  } finally {
    client.close();
    await exporter.shutdown();
  }
});

Deno.test("NBD: the replies to requests before a frame that cannot be trusted all arrive, though the client sent more", async () => {
  const server = await NbdServer.start(new MemoryDevice(1024 * 1024), {
    listen: { tcp: { hostname: "127.0.0.1", port: 0 } },
    name: "",
    description: "",
    log: quiet,
  });
  const port = (server.listener.addr as Deno.NetAddr).port;
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    // Fixed newstyle without zeroes, then EXPORT_NAME "": a 10-byte answer.
    await readExact(conn, new Uint8Array(18));
    const hello = new DataView(new ArrayBuffer(4 + 16));
    hello.setUint32(0, 3);
    hello.setBigUint64(4, 0x49484156454f5054n);
    hello.setUint32(12, 1);
    await writeAll(conn, new Uint8Array(hello.buffer));
    await readExact(conn, new Uint8Array(10));
    const requests = new Uint8Array(READS * 28);
    const view = new DataView(requests.buffer);
    for (let i = 0; i < READS; i++) {
      view.setUint32(i * 28, 0x25609513);
      view.setUint32(i * 28 + 12, i + 1); // cookie
      view.setUint32(i * 28 + 24, READ_BYTES);
    }
    const output = await within(10_000, "the server's close", sendThenBadFrame(conn, requests));
    assertAllReplies(output, 16 + READ_BYTES);
  } finally {
    closeQuietly(conn);
    await server.shutdown();
  }
});

// --- time limits, on a scripted connection and a clock the test moves -------------------

const SIZE = 1024 * 1024;

/** The server's side of a connection whose client is the test: it hands over bytes, and reads replies or not. */
class ScriptedConn implements ByteConn {
  readonly #inbox: Uint8Array[] = [];
  #reader: { into: Uint8Array; resolve: (n: number | null) => void } | null = null;
  readonly #heldWrites: Array<{ write: () => void; fail: () => void }> = [];
  #closed = false;
  /** While true, the server's writes wait for releaseWrite(): a client that does not read. */
  holdWrites = false;
  /** What the server wrote, in order. */
  readonly written: Uint8Array[] = [];

  get closed(): boolean {
    return this.#closed;
  }

  /** Bytes from the client. */
  deliver(bytes: Uint8Array): void {
    this.#inbox.push(bytes.slice());
    this.#pump();
  }

  /** Lets the oldest held write through; false when none was held. */
  releaseWrite(): boolean {
    const held = this.#heldWrites.shift();
    held?.write();
    return held !== undefined;
  }

  read(into: Uint8Array): Promise<number | null> {
    if (this.#closed) return Promise.resolve(null);
    assert.equal(this.#reader, null, "one read at a time");
    const { promise, resolve } = Promise.withResolvers<number | null>();
    this.#reader = { into, resolve };
    this.#pump();
    return promise;
  }

  write(data: Uint8Array): Promise<number> {
    if (this.#closed) return Promise.reject(new Deno.errors.BadResource("closed"));
    const copy = data.slice();
    if (!this.holdWrites) {
      this.written.push(copy);
      return Promise.resolve(copy.length);
    }
    const { promise, resolve, reject } = Promise.withResolvers<number>();
    this.#heldWrites.push({
      write: () => {
        this.written.push(copy);
        resolve(copy.length);
      },
      fail: () => reject(new Deno.errors.BadResource("closed")),
    });
    return promise;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#reader?.resolve(null);
    this.#reader = null;
    for (const held of this.#heldWrites.splice(0)) held.fail();
  }

  #pump(): void {
    const reader = this.#reader;
    const head = this.#inbox[0];
    if (reader === null || head === undefined) return;
    const n = Math.min(head.length, reader.into.length);
    reader.into.set(head.subarray(0, n));
    if (n === head.length) this.#inbox.shift();
    else this.#inbox[0] = head.subarray(n);
    this.#reader = null;
    reader.resolve(n);
  }
}

/** A logger that keeps its warnings. */
function warnings(): Logger & { lines: string[] } {
  const lines: string[] = [];
  return {
    lines,
    debug() {},
    info() {},
    warn: (m) => void lines.push(m),
    error: (m) => void lines.push(m),
  };
}

/** One connection of either protocol on a scripted connection, a manual clock and a memory device. */
interface Rig {
  conn: ScriptedConn;
  clock: ManualClock;
  device: MemoryDevice;
  log: Logger & { lines: string[] };
  loop: RequestLoop;
  /** True once serve() has returned: the accept loop frees the client place then. */
  served(): boolean;
  /** Lets what was delivered be read, then `ms` pass, then what that set off run. */
  pass(ms: number): Promise<void>;
}

type Protocol = "DST" | "NBD";

/**
 * Everything here is in memory, so a few turns of the event loop run every chain of
 * promises to its end. A close comes from a timer of the manual clock, so it has
 * happened by the time advance() returns: "still open" is exact, not a race.
 */
async function settle(): Promise<void> {
  for (let i = 0; i < 3; i++) await new Promise((resolve) => setTimeout(resolve, 0));
}

function rig(protocol: Protocol): Rig {
  const conn = new ScriptedConn();
  const clock = new ManualClock();
  const device = new MemoryDevice(SIZE);
  const log = warnings();
  const pool = new BufferPool(0);
  const loop: RequestLoop = protocol === "DST"
    ? new ExportConnection(conn, "peer", standaloneExportContext({ device, pool, log, clock }))
    : new NbdConnection(conn, "peer", {
      device,
      pool,
      log,
      clock,
      structuredReplies: false,
      acquire: null,
    });
  let served = false;
  void loop.serve().then(() => served = true);
  return {
    conn,
    clock,
    device,
    log,
    loop,
    served: () => served,
    async pass(ms) {
      await settle(); // what was delivered is read first
      clock.advance(ms);
      await settle();
    },
  };
}

/** A WRITE of `data` at offset 0, framed for `protocol`. */
function writeFrame(protocol: Protocol, data: Uint8Array, id = 1): Uint8Array {
  if (protocol === "DST") {
    return RawClient.frame({
      command: Command.WRITE,
      flags: 0,
      txId: id,
      offset: 0,
      length: data.length,
      payloadLength: data.length,
    }, data);
  }
  const frame = new Uint8Array(28 + data.length);
  const view = new DataView(frame.buffer);
  view.setUint32(0, 0x25609513);
  view.setUint16(6, 1); // NBD_CMD_WRITE
  view.setUint32(12, id); // cookie
  view.setUint32(24, data.length);
  frame.set(data, 28);
  return frame;
}

/** The connection is closed, serve() has returned, and one warning says why. */
function assertClosedWithOneLine(r: Rig, why: RegExp): void {
  assert.ok(r.conn.closed, "the server closed the connection");
  assert.ok(r.served(), "serve() returned, so the client place is free");
  assert.equal(r.log.lines.length, 1, r.log.lines.join("\n"));
  assert.match(r.log.lines[0]!, why);
}

Deno.test("DST: a connection with nothing in flight that sends nothing for CONNECTION_IDLE_MS is closed, with one log line", async () => {
  const r = rig("DST");
  await r.pass(CONNECTION_IDLE_MS / 2);
  assert.ok(!r.conn.closed, "still open half-way to the limit");
  await r.pass(CONNECTION_IDLE_MS);
  assertClosedWithOneLine(r, /^peer: sent nothing for \d+ s with nothing in flight; closing/);
});

Deno.test("DST: a client that pings at the longest --ping is never closed as idle", async () => {
  const r = rig("DST");
  for (let txId = 1; txId <= (3 * CONNECTION_IDLE_MS) / CLIENT_PING_MS_MAX; txId++) {
    r.conn.deliver(RawClient.frame({
      command: Command.PING,
      flags: 0,
      txId,
      offset: 0,
      length: 0,
      payloadLength: 0,
    }));
    await r.pass(CLIENT_PING_MS_MAX);
  }
  assert.ok(!r.conn.closed, r.log.lines.join("\n"));
  assert.equal(r.conn.written.reduce((n, w) => n + w.length, 0), 18 * 24, "every ping answered");
});

Deno.test("NBD: an idle connection stays open, as NBD clients keep idle connections and do not ping", async () => {
  const r = rig("NBD");
  await r.pass(5 * CONNECTION_IDLE_MS);
  assert.ok(!r.conn.closed, r.log.lines.join("\n"));
});

for (const protocol of ["DST", "NBD"] as const) {
  Deno.test(`${protocol}: a frame one byte short closes the connection FRAME_TIMEOUT_MS after its first byte, though bytes trickle in`, async () => {
    const r = rig(protocol);
    const frame = writeFrame(protocol, new Uint8Array(4096).fill(0xaa));
    const steps = 10;
    const piece = Math.ceil((frame.length - 1) / steps);
    for (let at = 0; at < frame.length - 1; at += piece) {
      r.conn.deliver(frame.subarray(at, Math.min(at + piece, frame.length - 1)));
      await r.pass(FRAME_TIMEOUT_MS / (2 * steps));
    }
    assert.ok(!r.conn.closed, "still open half-way to the limit");
    await r.pass(FRAME_TIMEOUT_MS / 2 + CONNECTION_CHECK_MS);
    assertClosedWithOneLine(r, /^peer: a frame was not whole \d+ s after its first byte; closing/);
    assert.equal(r.device.bytes[0], 0, "the partial write was never run");
  });

  Deno.test(`${protocol}: frames that are each whole within FRAME_TIMEOUT_MS are served, however long the connection lasts`, async () => {
    const r = rig(protocol);
    const data = new Uint8Array(4096).fill(0xbb);
    for (let id = 1; id <= 3; id++) {
      const frame = writeFrame(protocol, data, id);
      r.conn.deliver(frame.subarray(0, 1));
      await r.pass(FRAME_TIMEOUT_MS - 2 * CONNECTION_CHECK_MS);
      r.conn.deliver(frame.subarray(1));
      await r.pass(CONNECTION_CHECK_MS);
    }
    assert.ok(!r.conn.closed, r.log.lines.join("\n"));
    assert.equal(r.conn.written.length, 3, "three replies");
    assert.equal(r.device.bytes[0], 0xbb);
  });

  Deno.test(`${protocol}: a client that reads no replies for SEND_STALL_MS is closed; the write it sent still lands`, async () => {
    const r = rig(protocol);
    r.conn.holdWrites = true;
    r.conn.deliver(writeFrame(protocol, new Uint8Array(4096).fill(0xcc)));
    await r.pass(SEND_STALL_MS / 2);
    assert.ok(!r.conn.closed, "still open half-way to the limit");
    await r.pass(SEND_STALL_MS / 2 + CONNECTION_CHECK_MS);
    assertClosedWithOneLine(
      r,
      /^peer: no reply could be sent for \d+ s \(the client reads none\); closing/,
    );
    assert.equal(r.device.bytes[0], 0xcc, "the write landed");
    assert.equal(r.conn.written.length, 0, "its reply was dropped");
  });

  Deno.test(`${protocol}: a client that reads its replies slowly is not closed`, async () => {
    const r = rig(protocol);
    r.conn.holdWrites = true;
    for (let id = 1; id <= 4; id++) {
      r.conn.deliver(writeFrame(protocol, new Uint8Array(4096).fill(id), id));
      await r.pass(SEND_STALL_MS / 2); // each reply waits half the limit, four in a row
      assert.ok(r.conn.releaseWrite(), "a reply was waiting");
    }
    await r.pass(CONNECTION_CHECK_MS);
    assert.ok(!r.conn.closed, r.log.lines.join("\n"));
    assert.equal(r.conn.written.length, 4, "four replies");
  });
}
