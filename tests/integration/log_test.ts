/**
 * Logging never stops the export: with its stderr a pipe nobody reads (a full pipe
 * blocks a writer), thousands of log lines later it still serves clients, and once
 * stderr is read again it says how many lines it had to drop.
 */

import assert from "node:assert/strict";
import { BUNDLE, freshBundle, TEST_STATE_HOME } from "../helpers/spawn.ts";
import { DENO_RUN_ARGS } from "../../src/cli/self.ts";
import { closeQuietly, writeAll } from "../../src/transport/byte_conn.ts";
import { waitForLine } from "../../src/cli/self.ts";
import { RemoteDevice } from "../../src/client/remote_device.ts";
import { parseHostPort } from "../../src/lib/address.ts";
import { silentLogger } from "../../src/lib/log.ts";

Deno.test("an export whose stderr nobody reads goes on serving; the lines it could not keep are counted", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dst-log-" });
  await freshBundle();
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      ...DENO_RUN_ARGS,
      BUNDLE,
      "export",
      `${dir}/disk.img`,
      "--create",
      "1M",
      "--listen",
      "127.0.0.1:0",
    ],
    env: { XDG_STATE_HOME: TEST_STATE_HOME, DST_LOG: "debug" },
    stdout: "piped",
    stderr: "piped", // never read until the end: the pipe fills after about 64 KiB
  }).spawn();
  try {
    const ready = await waitForLine(child.stdout, / on (\S+)$/);
    const address = parseHostPort(ready[1]!, "127.0.0.1");
    // Each connection that is not a DST client costs the export a log line or two.
    const junk = new TextEncoder().encode("GET / HTTP/1.0\r\n\r\n");
    for (let i = 0; i < 3000; i++) {
      const conn = await Deno.connect(address);
      await writeAll(conn, junk).catch(() => {});
      closeQuietly(conn);
    }
    const client = await RemoteDevice.connect(address, { log: silentLogger, timeoutMs: 5_000 });
    await client.write(0, new Uint8Array(4096).fill(9));
    await client.flush();
    await client.close();
    child.kill("SIGTERM");
    const [status, stderr] = await Promise.all([
      child.status,
      new Response(child.stderr).text(),
    ]);
    assert.equal(status.code, 0, stderr.slice(-2000));
    assert.match(stderr, /log lines dropped: stderr was not being read/);
    assert.match(stderr, /stopped cleanly/, "the last lines are written before it exits");
  } finally {
    try {
      child.kill("SIGKILL");
    } catch {
      // exited
    }
    await child.status;
    await Deno.remove(dir, { recursive: true });
  }
});
