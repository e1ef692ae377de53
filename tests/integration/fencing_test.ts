/**
 * Fencing, through the real CLI and a real NBD client (libnbd's Python binding):
 * a connection the client gave up on can still deliver its bytes to the export late,
 * as a TCP retransmission does after a partition heals. The export must never run
 * them after the client's newer writes were answered (protocol README, "Fencing").
 *
 * The link between `dst attach` and `dst export` goes through a fault proxy: it is
 * cut while write A is in flight (A's bytes are held on the old connection), healed,
 * and only after a newer write B to the same bytes was acknowledged and flushed are
 * A's held bytes delivered to the export. The image must hold B.
 */

import assert from "node:assert/strict";
import { FaultProxy } from "../helpers/fault_proxy.ts";
import { type RunningDst, startAttach, startExport } from "../helpers/spawn.ts";
import { missing } from "../helpers/tools.ts";

const KiB = 1024;
const OFFSET = 64 * KiB;
const LENGTH = 64 * KiB;
const A = 0xaa;
const B = 0xbb;

/**
 * The NBD client's side, in Python (libnbd): write A, then (after the test says "go"
 * on stdin) write B with FUA and flush. Prints "A ok" or "A failed: ..." and "B ok".
 */
const CLIENT = `
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
offset, length = int(sys.argv[2]), int(sys.argv[3])
try:
    h.pwrite(bytes([${A}]) * length, offset)
    print("A ok", flush=True)
except nbd.Error as e:
    print("A failed:", e, flush=True)
sys.stdin.readline()
h.pwrite(bytes([${B}]) * length, offset, nbd.CMD_FLAG_FUA)
h.flush()
print("B ok", flush=True)
h.shutdown()
`;

/** A running Python NBD client: its stdout lines as they come, and a way to say "go". */
class NbdScript {
  readonly #process: Deno.ChildProcess;
  readonly #lines: AsyncIterator<string>;
  #buffer = "";

  constructor(uri: string) {
    this.#process = new Deno.Command("/usr/bin/python3", {
      args: ["-c", CLIENT, uri, String(OFFSET), String(LENGTH)],
      stdin: "piped",
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    this.#lines = this.#process.stdout.pipeThrough(new TextDecoderStream())[
      Symbol.asyncIterator
    ]();
  }

  /** The next line it prints. */
  async line(): Promise<string> {
    while (!this.#buffer.includes("\n")) {
      const next = await this.#lines.next();
      if (next.done) throw new Error(`the NBD client ended; it printed ${this.#buffer}`);
      this.#buffer += next.value;
    }
    const at = this.#buffer.indexOf("\n");
    const line = this.#buffer.slice(0, at);
    this.#buffer = this.#buffer.slice(at + 1);
    return line;
  }

  async go(): Promise<void> {
    const writer = this.#process.stdin.getWriter();
    await writer.write(new TextEncoder().encode("go\n"));
    await writer.close();
  }

  async finish(): Promise<Deno.CommandStatus> {
    return await this.#process.status;
  }

  kill(): void {
    try {
      this.#process.kill("SIGKILL");
    } catch {
      // ended
    }
  }
}

interface Rig {
  proxy: FaultProxy;
  attach: RunningDst & { uri: string };
}

/**
 * An export, a fault proxy in front of it, and an attach through the proxy; runs
 * `body`, stops everything cleanly, and returns what the image holds at the test range.
 */
async function withRig(
  attachOptions: string[],
  body: (rig: Rig) => Promise<void>,
): Promise<Uint8Array> {
  const dir = await Deno.makeTempDir({ prefix: "dst-fencing-" });
  const image = `${dir}/disk.img`;
  const server = await startExport([image, "--create", "1M", "--listen", "127.0.0.1:0"]);
  const proxy = FaultProxy.start(server.address);
  const target = `${proxy.address.hostname}:${proxy.address.port}`;
  let attach: (RunningDst & { uri: string }) | null = null;
  try {
    attach = await startAttach([target, "--socket", `${dir}/nbd.sock`, ...attachOptions]);
    await body({ proxy, attach });
    assert.equal((await attach.stop()).code, 0, attach.log());
    assert.equal((await server.stop()).code, 0, server.log());
    const bytes = await Deno.readFile(image);
    return bytes.slice(OFFSET, OFFSET + LENGTH);
  } finally {
    await attach?.stop("SIGKILL");
    await proxy.close();
    await server.stop("SIGKILL");
    await Deno.remove(dir, { recursive: true });
  }
}

function assertAll(bytes: Uint8Array, value: number, what: string): void {
  const wrong = bytes.findIndex((byte) => byte !== value);
  assert.equal(
    wrong,
    -1,
    `${what}: byte ${wrong} is 0x${bytes[wrong]?.toString(16)}, not 0x${value.toString(16)}`,
  );
}

/** Delivers the old connection's held bytes now, and gives the export time to run them if it would. */
async function deliverLate(proxy: FaultProxy): Promise<void> {
  await proxy.deliverHeld();
  await new Promise((resolve) => setTimeout(resolve, 500));
}

/**
 * The stale-write sequence: the link is cut with write A in flight (A's bytes held on
 * the old connection); the link heals either at once (`healBeforeA`: the attach
 * resends A and it is acknowledged) or only after A has failed (its retries used up);
 * then write B to the same bytes with FUA and a flush; then A's held bytes reach the
 * export late. Returns the image's bytes at the range after a clean stop.
 */
function staleWrite(attachOptions: string[], healBeforeA: boolean): Promise<Uint8Array> {
  return withRig(attachOptions, async (rig) => {
    rig.proxy.cut();
    const client = new NbdScript(rig.attach.uri);
    try {
      await rig.proxy.whenHeldBytes(LENGTH);
      if (healBeforeA) {
        rig.proxy.heal();
        // The attach finds the link dead, reconnects, and resends A, which is acknowledged.
        assert.equal(await client.line(), "A ok");
      } else {
        // The partition outlasts A's retries: A fails, and the NBD client sees the error.
        assert.match(await client.line(), /^A failed/);
        rig.proxy.heal();
      }
      await client.go();
      assert.equal(await client.line(), "B ok");
      assert.equal((await client.finish()).code, 0);
    } finally {
      client.kill();
    }
    // The partition heals for the old connection too: its A reaches the export now.
    await deliverLate(rig.proxy);
  });
}

Deno.test({
  name:
    "a stale connection's write delivered late never lands after a newer acknowledged write (dst attach, libnbd)",
  ignore: missing("nbdsh"),
  fn: async () => {
    const held = await staleWrite(["--timeout", "500", "--retries", "20"], true);
    assertAll(held, B, "the image after A's late delivery");
  },
});

Deno.test({
  name:
    "a write that failed after all retries, then an overlapping write: the failed one's late delivery never lands after it",
  ignore: missing("nbdsh"),
  fn: async () => {
    const held = await staleWrite(["--timeout", "300", "--retries", "1"], false);
    assertAll(held, B, "the image after the failed A's late delivery");
  },
});
