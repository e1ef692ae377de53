/**
 * `dst export --nbd` served by several threads (src/server/nbd_threads.ts), with real
 * clients: nbdcopy's four connections land on more than one thread, what one thread
 * wrote every other reads, the image file holds exactly the data, `dst status`
 * counts the traffic of every thread, NBD writes take the one writer lease and start a
 * write generation on whichever thread they land (reads do not), and SIGTERM stops
 * every thread cleanly.
 */

import assert from "node:assert/strict";
import { assertSameBytes } from "../helpers/bytes.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import {
  freshBundle,
  newDisk,
  runDst,
  type RunningExport,
  serving,
  TEST_STATE_HOME,
  withExport,
} from "../helpers/spawn.ts";
import { missing, toolOk } from "../helpers/tools.ts";
import { RemoteDevice } from "../../src/client/remote_device.ts";
import { silentLogger as quiet } from "../../src/lib/log.ts";
import { CLIENTS_PER_ADDRESS_MAX } from "../../src/constants.ts";

const MiB = 1024 * 1024;
const IMAGE_BYTES = 64 * MiB;

interface ExportCounters {
  readBytes: number;
  writtenBytes: number;
  writeGeneration: number;
}

async function counters(server: RunningExport): Promise<ExportCounters> {
  const result = await runDst(["status", `127.0.0.1:${server.address.port}`, "--json"]);
  assert.equal(result.code, 0, result.stderr);
  const [only] = JSON.parse(result.stdout) as Array<{ status: ExportCounters }>;
  return only!.status;
}

/** Status until `done` holds: workers publish their counters every 250 ms. */
async function countersWhen(
  server: RunningExport,
  done: (c: ExportCounters) => boolean,
): Promise<ExportCounters> {
  for (let i = 0;; i++) {
    const c = await counters(server);
    if (done(c) || i === 40) return c;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** The log components that accepted NBD clients: "nbd" (this thread), "nbd#1"... (workers). */
function threadsThatServed(log: string): Set<string> {
  return new Set([...log.matchAll(/ (nbd(?:#\d+)?): \S+: client connected/g)].map((m) => m[1]!));
}

/** nbdsh code: `count` connections one after another, each writing 4 KiB at its own offset. */
/** One NBD connection that writes 4 KiB of `value` at `offset` and leaves. */
function oneWriter(uri: string, offset: number, value: number): string {
  return [
    `h.connect_uri("${uri}")`,
    `h.pwrite(bytes([${value}]) * 4096, ${offset})`,
    `h.shutdown()`,
  ].join("\n");
}

Deno.test({
  name:
    "export --nbd on 4 threads: nbdcopy's connections spread over them, data and status are whole",
  ignore: missing("nbdcopy", "nbdsh"),
  fn: () =>
    withExport(
      "dst-nbd-threads-",
      (dir) => [...newDisk(String(IMAGE_BYTES))(dir), "--nbd", "127.0.0.1:0", "--nbd-threads", "4"],
      async (server, dir) => {
        const uri = server.nbdUri!;
        assert.match(server.log(), /NBD is served by 4 threads/);
        const before = await counters(server);

        // Reads alone start no write generation.
        await toolOk("nbdcopy", [uri, `${dir}/empty.bin`]);
        const afterRead = await countersWhen(server, (c) => c.readBytes >= IMAGE_BYTES);
        assert.equal(afterRead.writeGeneration, before.writeGeneration, "reads start nothing");
        assert.ok(
          afterRead.readBytes >= IMAGE_BYTES,
          `status counts every thread's reads: ${JSON.stringify(afterRead)}`,
        );

        const source = randomBytes(IMAGE_BYTES);
        await Deno.writeFile(`${dir}/source.bin`, source);
        await toolOk("nbdcopy", [`${dir}/source.bin`, uri]);
        await toolOk("nbdcopy", [uri, `${dir}/back.bin`]);
        assertSameBytes(await Deno.readFile(`${dir}/back.bin`), source, "read back over NBD");
        assertSameBytes(await Deno.readFile(`${dir}/disk.img`), source, "the image file");
        const afterCopy = await countersWhen(server, (c) => c.writtenBytes >= IMAGE_BYTES);

        // The NBD port is one writer: nbdcopy's connections together started one generation.
        assert.equal(afterCopy.writeGeneration, before.writeGeneration + 1);
        // A DST writer, then a new NBD connection, in turns: each grant goes to another
        // writer, so each raises the generation, on whichever thread the NBD one lands.
        const rounds = 8;
        for (let i = 0; i < rounds; i++) {
          const dst = await RemoteDevice.connect(server.address, { log: quiet });
          await dst.write(2 * i * 4096, new Uint8Array(4096).fill(i + 1));
          await dst.close();
          await toolOk("nbdsh", ["-c", oneWriter(uri, (2 * i + 1) * 4096, i + 1)]);
        }
        const written = IMAGE_BYTES + 2 * rounds * 4096;
        const after = await countersWhen(server, (c) => c.writtenBytes >= written);
        assert.equal(after.writtenBytes, written, "status counts every thread's writes");
        assert.equal(after.writeGeneration, afterCopy.writeGeneration + 2 * rounds);

        // 8 writers and nbdcopy's connections over 4 listeners: all on one thread is 1 in 4^9.
        const served = threadsThatServed(server.log());
        assert.ok(served.size >= 2, `connections all on one thread: ${[...served].join(", ")}`);

        const stopped = await server.stop("SIGTERM");
        assert.equal(stopped.code, 0, server.log());
        assert.match(server.log(), /stopped cleanly/);
      },
    ),
});

Deno.test("--nbd-threads is checked: a count from 1 to 64, and only with --nbd", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dst-nbd-threads-" });
  try {
    const image = [`${dir}/disk.img`, "--create", "1M", "--listen", "127.0.0.1:0"];
    const zero = await runDst(["export", ...image, "--nbd", "127.0.0.1:0", "--nbd-threads", "0"]);
    assert.equal(zero.code, 2);
    assert.match(zero.stderr, /--nbd-threads must be a whole number from 1 to 64, not "0"/);
    const alone = await runDst(["export", ...image, "--nbd-threads", "2"]);
    assert.equal(alone.code, 2);
    assert.match(alone.stderr, /--nbd-threads goes with --nbd/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name: "without --unstable-net the export serves NBD from one thread, and says so",
  ignore: missing("nbdinfo"),
  fn: async () => {
    const dir = await Deno.makeTempDir({ prefix: "dst-nbd-threads-" });
    const process = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        await freshBundle(),
        "export",
        ...newDisk("1M")(dir),
        "--nbd",
        "127.0.0.1:0",
      ],
      env: { XDG_STATE_HOME: TEST_STATE_HOME },
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const server = await serving(process, "dst export", / at (nbd\S+)\n/);
    try {
      assert.match(server.log(), /NBD is served by one thread: .*--unstable-net/);
      const size = await toolOk("nbdinfo", ["--size", server.ready[1]!]);
      assert.equal(size.trim(), String(MiB));
    } finally {
      assert.equal((await server.stop("SIGTERM")).code, 0, server.log());
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "the NBD threads of one export share one per-address limit and one port",
  ignore: missing("nbdsh"),
  fn: () =>
    withExport(
      "dst-nbd-threads-",
      (dir) => [...newDisk("1M")(dir), "--nbd", "127.0.0.1:0", "--nbd-threads", "4"],
      async (server, dir) => {
        const uri = server.nbdUri!;
        // 16 clients from 127.0.0.1 held open over 4 threads; the 17th is turned away by
        // whichever thread. (The 64-client limit is shared the same way, through the same
        // array, but one host cannot reach it any more: accept_loop_test.ts covers it.)
        const out = await toolOk("nbdsh", ["-c", fillClientLimit(uri, CLIENTS_PER_ADDRESS_MAX)]);
        assert.equal(out.trim(), `${CLIENTS_PER_ADDRESS_MAX} connected, the next refused`);
        assert.match(
          server.log(),
          new RegExp(
            `127\\.0\\.0\\.1: connection refused, ${CLIENTS_PER_ADDRESS_MAX} already open`,
          ),
        );

        // Another export cannot take over the port, as it could not with one thread.
        const port = new URL(uri).port;
        const second = await runDst(
          ["export", `${dir}/other.img`, "--create", "1M", "--nbd", `127.0.0.1:${port}`],
        );
        assert.equal(second.code, 1);
        assert.match(second.stderr, /Cannot listen on 127\.0\.0\.1:\d+: .*pick another with --nbd/);
        const size = await toolOk("nbdinfo", ["--size", uri]);
        assert.equal(size.trim(), String(MiB), "the first export still serves its port");
      },
    ),
});

/** nbdsh code: opens `count` connections and keeps them, then checks that one more is refused. */
function fillClientLimit(uri: string, count: number): string {
  return [
    `held = []`,
    `for i in range(${count}):`,
    `    c = nbd.NBD()`,
    `    c.connect_uri("${uri}")`,
    `    held.append(c)`,
    `try:`,
    `    extra = nbd.NBD()`,
    `    extra.connect_uri("${uri}")`,
    `    print("the next one connected too")`,
    `except nbd.Error:`,
    `    print(f"{len(held)} connected, the next refused")`,
  ].join("\n");
}
