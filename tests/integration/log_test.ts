/**
 * Logging never stops the export: with its stderr a pipe nobody reads (a full pipe
 * blocks a writer), after 15,000 refused connections and far more log than the pipe
 * holds, it still serves clients, and a clean stop still writes its last lines.
 */

import assert from "node:assert/strict";
import { BUNDLE, freshBundle, TEST_STATE_HOME } from "../helpers/spawn.ts";
import { DENO_RUN_ARGS } from "../../src/cli/self.ts";
import { closeQuietly, writeAll } from "../../src/transport/byte_conn.ts";
import { waitForLine } from "../../src/cli/self.ts";
import { RemoteDevice } from "../../src/client/remote_device.ts";
import { parseHostPort } from "../../src/lib/address.ts";
import { silentLogger } from "../../src/lib/log.ts";
import { waitUntil } from "../helpers/wait.ts";

Deno.test("an export whose stderr nobody reads goes on serving, and writes its last lines before it exits", async () => {
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
    // Each connection that is not a DST client costs the export a log line or two. The
    // export must have closed one before a worker opens the next: connections past the
    // per-address limit are refused with one line per 10 s, and then how much is logged
    // would depend on how fast this machine is.
    const junk = new TextEncoder().encode("GET / HTTP/1.0\r\n\r\n");
    const sendJunk = async () => {
      const conn = await Deno.connect(address);
      try {
        await writeAll(conn, junk).catch(() => {});
        await conn.closeWrite().catch(() => {});
        const sink = new Uint8Array(1024);
        while ((await conn.read(sink).catch(() => null)) !== null) {
          // until the export closes it
        }
      } finally {
        closeQuietly(conn);
      }
    };
    const WORKERS = 8; // under the 16 one address may hold
    await Promise.all(
      Array.from({ length: WORKERS }, async () => {
        for (let i = 0; i < 15_000 / WORKERS; i++) await sendJunk();
      }),
    );
    // The export works through the backlog of refusals (each address may hold 16
    // connections at once, so this one may be turned away until it has).
    let client: RemoteDevice | null = null;
    await waitUntil(
      async () => {
        client = await RemoteDevice.connect(address, { log: silentLogger }).catch(() => null);
        return client !== null;
      },
      "a DST client served",
      { timeoutMs: 20_000, everyMs: 100 },
    );
    client = client!;
    await client.write(0, new Uint8Array(4096).fill(9));
    await client.flush();
    await client.close();
    child.kill("SIGTERM");
    const [status, stderr] = await Promise.all([
      child.status,
      new Response(child.stderr).text(),
    ]);
    assert.equal(status.code, 0, stderr.slice(-2000));
    assert.ok(
      stderr.length > 256 * 1024,
      `only ${stderr.length} bytes of log: the pipe never filled`,
    );
    // The queue was full when it stopped, so its last lines may have been among those
    // dropped; then the count of dropped lines is what it wrote last.
    assert.match(
      stderr.trimEnd().split("\n").at(-1) ?? "",
      /stopped cleanly|log lines dropped: stderr was not being read/,
      "what it logged last is written before it exits",
    );
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
