/**
 * `dst status` at an address that drops SYNs, through the real CLI: it reports that
 * nothing answered after CONNECT_TIMEOUT_MS (10 s), instead of hanging for the two
 * minutes the kernel goes on resending the SYN.
 *
 * The black hole is made on loopback without privileges: a listener that never
 * accepts, its accept queue filled up. Linux then drops each further SYN silently, as
 * a firewall's DROP rule would (with net.ipv4.tcp_abort_on_overflow at its default 0),
 * and the client's connect hangs in SYN_SENT.
 */

import assert from "node:assert/strict";
import { CONNECT_TIMEOUT_MS } from "../../src/constants.ts";
import { closeQuietly } from "../../src/transport/byte_conn.ts";
import { runDst } from "../helpers/spawn.ts";

/** How long a probe connect waits before the port counts as dropping SYNs. */
const PROBE_MS = 300;
/** More connections than any listen backlog Deno uses (511 in 2.x). */
const FILLERS_MAX = 5_000;

/**
 * A port on 127.0.0.1 whose SYNs go unanswered: a listener that is never accepted
 * from, filled until a connect to it hangs. `close()` releases it all.
 */
async function silentPort(): Promise<{ port: number; close(): void }> {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = listener.addr.port;
  const fillers: Deno.Conn[] = [];
  const close = () => {
    for (const conn of fillers) closeQuietly(conn);
    closeQuietly(listener);
  };
  try {
    while (fillers.length < FILLERS_MAX) {
      try {
        fillers.push(
          await Deno.connect({
            hostname: "127.0.0.1",
            port,
            signal: AbortSignal.timeout(PROBE_MS),
          }),
        );
      } catch {
        return { port, close }; // this connect got no answer: the queue is full
      }
    }
  } catch (error) {
    close();
    throw error;
  }
  close();
  throw new Error(`${FILLERS_MAX} connections did not fill the accept queue`);
}

Deno.test("dst status at an address that drops SYNs says so after the connect time limit, not the kernel's two minutes", async () => {
  const silent = await silentPort();
  try {
    const where = `127.0.0.1:${silent.port}`;
    const started = performance.now();
    const result = await runDst(["status", where]);
    const elapsedMs = performance.now() - started;
    const output = result.stdout + result.stderr;
    assert.equal(result.code, 1, output);
    assert.match(
      output,
      new RegExp(
        `Cannot connect to ${where}: no answer within 10 s \\(is the host up, its name resolving, and is a ` +
          `firewall dropping its packets\\?\\)`,
      ),
    );
    assert.ok(elapsedMs >= CONNECT_TIMEOUT_MS, `it waited only ${Math.round(elapsedMs)} ms`);
    // Starting the CLI is in it; the kernel alone would have taken about 127 s.
    assert.ok(elapsedMs < CONNECT_TIMEOUT_MS + 10_000, `it took ${Math.round(elapsedMs)} ms`);
  } finally {
    silent.close();
  }
});
