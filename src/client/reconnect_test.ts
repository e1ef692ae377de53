/**
 * RemoteDevice's reconnect loop against a connect that gets no answer (the export's
 * host down, or a firewall dropping packets), in one process: an Exporter of a
 * MemoryDevice on loopback, the client's time on a ManualClock, and a dialer whose
 * second connect never completes, as a SYN into a black hole. The loop gives that
 * connect up after CONNECT_TIMEOUT_MS, as it would a refused one, and tries again;
 * without the limit it waited for the kernel's two minutes of resent SYNs, with every
 * request queued behind it.
 */

import assert from "node:assert/strict";
import { ScriptedConn } from "../../tests/helpers/golden.ts";
import { ManualClock } from "../../tests/helpers/manual_clock.ts";
import { waitUntil } from "../../tests/helpers/wait.ts";
import { CONNECT_TIMEOUT_MS, RECONNECT_DELAY_MS_MIN } from "../constants.ts";
import { MemoryDevice } from "../device/memory_device.ts";
import { silentLogger as quiet } from "../lib/log.ts";
import { Exporter } from "../server/exporter.ts";
import type { ByteConn } from "../transport/byte_conn.ts";
import type { Dialer } from "./dial.ts";
import { RemoteDevice } from "./remote_device.ts";

/** Lets the client run as far as it can without more input or time. */
const settle = () => new Promise((resolve) => setTimeout(resolve, 0));

Deno.test("a reconnect whose connect gets no answer gives it up after CONNECT_TIMEOUT_MS and tries again", async () => {
  const device = new MemoryDevice(1024 * 1024);
  device.bytes.fill(7, 0, 4096);
  const exporter = Exporter.start(device, {
    listen: { hostname: "127.0.0.1", port: 0 },
    log: quiet,
  });
  const clock = new ManualClock();
  const unanswered = Promise.withResolvers<ByteConn>();
  const opened: Deno.TcpConn[] = [];
  let dials = 0;
  const dial: Dialer = async (address, signal?: AbortSignal) => {
    dials += 1;
    if (dials === 2) return await unanswered.promise;
    const conn = await Deno.connect({ hostname: address.hostname, port: address.port, signal });
    opened.push(conn);
    return conn;
  };
  // random 0.5: no jitter, each reconnect delay is exactly its nominal value.
  const client = await RemoteDevice.connect(exporter.address, {
    dial,
    clock,
    random: () => 0.5,
    log: quiet,
  });
  try {
    opened[0]!.close(); // the link drops
    await waitUntil(() => !client.connected, "the client to notice", { timeoutMs: 5_000 });
    await settle();
    clock.advance(RECONNECT_DELAY_MS_MIN);
    await waitUntil(() => dials === 2, "the first reconnect", { timeoutMs: 5_000 });

    clock.advance(CONNECT_TIMEOUT_MS - 1);
    await settle();
    assert.equal(dials, 2, "the unanswered connect still has time");
    clock.advance(1);
    // The next try comes after the doubled delay; the clock moves in steps until it has.
    await waitUntil(
      () => {
        clock.advance(RECONNECT_DELAY_MS_MIN);
        return client.connected;
      },
      "the next try to connect",
      { timeoutMs: 5_000 },
    );
    assert.equal(dials, 3);
    const read = new Uint8Array(4096);
    await client.read(0, read);
    assert.deepEqual(read, new Uint8Array(4096).fill(7));

    // The connect given up completes after all: that connection is closed, not leaked.
    const late = new ScriptedConn();
    unanswered.resolve(late);
    await settle();
    assert.ok(late.closed, "the late connection is closed");
  } finally {
    await client.close();
    await exporter.shutdown();
  }
});
