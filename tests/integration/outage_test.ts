/**
 * Outages, with the real `dst export` process: killed with SIGKILL in the middle of a
 * write stream and restarted within the resend window, the writer sees no error and
 * every acknowledged byte is in the image; an export that never comes back makes
 * each transaction fail after its resends; an export that comes back as another
 * disk is refused; an idle connection to a frozen export is noticed by the ping.
 */

import assert from "node:assert/strict";
import { RemoteDevice } from "../../src/client/remote_device.ts";
import { DeviceError } from "../../src/lib/errors.ts";
import { assertSameBytes, settleAll } from "../helpers/bytes.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import { newDisk, startExport, withExport } from "../helpers/spawn.ts";
import { silentLogger as quiet } from "../../src/lib/log.ts";
import { waitUntil } from "../helpers/wait.ts";

const MiB = 1024 * 1024;

Deno.test("kill -9 of the export mid-write and a restart: no error, every acknowledged byte is there", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dst-outage-" });
  const image = `${dir}/disk.img`;
  const size = 32 * MiB;
  let server = await startExport([image, "--create", String(size), "--listen", "127.0.0.1:0"]);
  const listen = `127.0.0.1:${server.address.port}`;
  try {
    // Default timeout and retries: the defaults are what must ride out the outage.
    const client = await RemoteDevice.connect(server.address, { log: quiet });
    const model = randomBytes(size);
    const chunk = 64 * 1024;
    const inFlight = 16;
    let next = 0;
    let acked = 0;
    let killed = false;
    let restarted: Promise<void> | null = null;
    const writer = async () => {
      while (next < size) {
        const at = next;
        next += chunk;
        await client.write(at, model.subarray(at, at + chunk));
        acked += 1;
        if (!killed && acked === 100) {
          killed = true;
          await server.stop("SIGKILL");
          restarted = (async () => {
            await new Promise((resolve) => setTimeout(resolve, 1500));
            server = await startExport([image, "--listen", listen]);
          })();
        }
      }
    };
    await settleAll(Array.from({ length: inFlight }, writer));
    await restarted;
    await client.flush();
    const stats = client.transportStats();
    assert.ok(killed, "the export was killed mid-stream");
    assert.ok(stats.reconnects >= 1, "the client reconnected");
    assert.ok(stats.resends >= 1, "writes in flight at the kill were resent");

    const back = new Uint8Array(size);
    await client.read(0, back);
    assertSameBytes(back, model, "read back after the outage");
    await client.close();
    assert.equal((await server.stop("SIGTERM")).code, 0);
    assertSameBytes(await Deno.readFile(image), model, "the image file after the outage");
  } finally {
    await server.stop("SIGKILL");
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("an export that stays down fails each transaction after its resends, with ETIMEDOUT", async () => {
  await withExport("dst-down-", newDisk("1M"), async (server) => {
    const client = await RemoteDevice.connect(server.address, {
      timeoutMs: 300,
      retries: 2,
      log: quiet,
    });
    await client.write(0, new Uint8Array(4096).fill(7));
    await server.stop("SIGKILL");
    const started = performance.now();
    await assert.rejects(
      client.write(4096, new Uint8Array(4096)),
      (e) =>
        e instanceof DeviceError && e.errno === "ETIMEDOUT" && /after 3 attempts/.test(e.message),
    );
    const elapsed = performance.now() - started;
    assert.ok(elapsed >= 600, `gave up after ${elapsed} ms, before the resends were used`);
    assert.ok(elapsed < 5000, `gave up only after ${elapsed} ms`);
    await client.close();
  });
});

Deno.test("an export that comes back as a different disk is refused with ESTALE", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dst-stale-" });
  let server = await startExport([`${dir}/a.img`, "--create", "1M", "--listen", "127.0.0.1:0"]);
  const listen = `127.0.0.1:${server.address.port}`;
  try {
    const client = await RemoteDevice.connect(server.address, {
      timeoutMs: 1000,
      retries: 3,
      log: quiet,
    });
    await client.write(0, new Uint8Array(4096).fill(1));
    await server.stop("SIGKILL");
    server = await startExport([`${dir}/b.img`, "--create", "1M", "--listen", listen]);
    await assert.rejects(
      client.write(0, new Uint8Array(4096).fill(2)),
      (e) => e instanceof DeviceError && e.errno === "ESTALE" && /different export/.test(e.message),
    );
    await client.close();
    const b = await Deno.readFile(`${dir}/b.img`);
    assert.ok(b.every((byte) => byte === 0), "nothing was written to the other disk");
  } finally {
    await server.stop("SIGKILL");
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("an idle ping notices a frozen export, and the client reconnects when it thaws", async () => {
  await withExport("dst-ping-", newDisk("1M"), async (server) => {
    const client = await RemoteDevice.connect(server.address, {
      timeoutMs: 400,
      retries: 20,
      pingMs: 200,
      log: quiet,
    });
    server.process.kill("SIGSTOP");
    await waitUntil(() => !client.connected, "the ping to notice the frozen export", {
      timeoutMs: 5000,
    });
    server.process.kill("SIGCONT");
    await waitUntil(() => client.connected, "the client to reconnect", { timeoutMs: 10000 });
    await client.write(0, new Uint8Array(4096).fill(9));
    const back = new Uint8Array(4096);
    await client.read(0, back);
    assert.equal(back[4095], 9);
    assert.ok(client.transportStats().reconnects >= 1);
    await client.close();
  });
});
