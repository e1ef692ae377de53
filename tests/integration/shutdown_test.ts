/**
 * A clean stop has a deadline: SIGTERM finishes what is in flight, but a client that
 * never reads its replies (so they can never be sent) does not hold the export up
 * for more than 10 s; it exits 0 after flushing, saying it stopped without them.
 */

import assert from "node:assert/strict";
import { Command } from "../../src/protocol/mod.ts";
import { RawClient } from "../helpers/raw_client.ts";
import { newDisk, withExport } from "../helpers/spawn.ts";

const MiB = 1024 * 1024;

Deno.test("SIGTERM stops the export within 10 s though a client never reads its replies", () =>
  withExport("dst-shutdown-", newDisk("64M"), async (server) => {
    const raw = await RawClient.connect(server.address);
    try {
      // 64 reads of 1 MiB and no reading: the replies fill the socket and the send queue.
      for (let txId = 1; txId <= 64; txId++) {
        await raw.send(RawClient.frame({
          command: Command.READ,
          flags: 0,
          txId,
          offset: (txId - 1) * MiB,
          length: MiB,
          payloadLength: 0,
        }));
      }
      await new Promise((resolve) => setTimeout(resolve, 500)); // the export is stuck sending
      const started = performance.now();
      let timer: ReturnType<typeof setTimeout> | undefined;
      const status = await Promise.race([
        server.stop("SIGTERM"),
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new Error("still running 30 s after SIGTERM")), 30_000);
        }),
      ]).finally(() => clearTimeout(timer));
      const seconds = (performance.now() - started) / 1000;
      assert.equal(status.code, 0, server.log());
      assert.ok(seconds < 13, `stopped after ${seconds.toFixed(1)} s`);
      assert.match(server.log(), /did not finish within 10 s/);
    } finally {
      raw.close();
    }
  }));
