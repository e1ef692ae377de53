/**
 * RequestLoop's close, through both servers that use it, in one process (real sockets
 * on loopback). A server that closes a connection because of a frame it cannot trust
 * first answers every request it had dispatched (protocol README, "Invalid input"), and
 * those answers must reach the client also when the client had sent more after the bad
 * frame, as a client pipelining requests does. Closing a socket with bytes unread makes
 * the kernel reset the connection, and the reset drops what the client had not read
 * yet. Found by the frame fuzzing (tests/property/*_frame_fuzz_test.ts).
 */

import assert from "node:assert/strict";
import { MemoryDevice } from "../device/memory_device.ts";
import { silentLogger as quiet } from "../lib/log.ts";
import { NbdServer } from "../nbd/server.ts";
import { Command } from "../protocol/mod.ts";
import { Exporter } from "../server/exporter.ts";
import { closeQuietly, readExact, writeAll } from "./byte_conn.ts";
import { concat } from "../../tests/helpers/bytes.ts";
import { readToEnd, within } from "../../tests/helpers/frame_fuzz.ts";
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
