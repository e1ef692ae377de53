/**
 * A clean stop has a deadline: SIGTERM finishes what is in flight, but a client that
 * never reads its replies (so they can never be sent) does not hold the export up
 * for more than 10 s; it exits 0 after flushing, saying it stopped without them. A
 * second SIGTERM does not wait for that: it exits 130 at once, saying so first.
 */

import assert from "node:assert/strict";
import { Command } from "../../src/protocol/mod.ts";
import { RawClient } from "../helpers/raw_client.ts";
import { newDisk, type RunningExport, withExport } from "../helpers/spawn.ts";
import { waitUntil } from "../helpers/wait.ts";

const MiB = 1024 * 1024;

/** Runs `body` while a client of `server` has 64 MiB of replies it never reads. */
async function withStuckClient(server: RunningExport, body: () => Promise<void>): Promise<void> {
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
    await body();
  } finally {
    raw.close();
  }
}

Deno.test("SIGTERM stops the export within 10 s though a client never reads its replies", () =>
  withExport("dst-shutdown-", newDisk("64M"), (server) =>
    withStuckClient(server, async () => {
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
    })));

Deno.test("a second SIGTERM while the export finishes what is in flight exits 130 at once, and says so", () =>
  withExport(
    "dst-shutdown-twice-",
    newDisk("64M"),
    (server) =>
      withStuckClient(server, async () => {
        server.process.kill("SIGTERM");
        await waitUntil(() => /SIGTERM: no new clients/.test(server.log()), "the first stop", {
          timeoutMs: 5000,
        });
        const started = performance.now();
        server.process.kill("SIGTERM"); // the user insists
        const status = await server.process.status;
        const seconds = (performance.now() - started) / 1000;
        assert.equal(status.code, 130, server.log());
        assert.ok(seconds < 5, `exited after ${seconds.toFixed(1)} s`);
        assert.match(
          server.log(),
          /WARN +dst: second SIGTERM: exiting at once, without finishing what is in flight\n/,
        );
      }),
  ));
