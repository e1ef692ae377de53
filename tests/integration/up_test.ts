/**
 * `dst up NODE.yaml` through the real CLI: a node file with two exports, a mirror of
 * them and an attach of the mirror starts them all; data written with nbdcopy through
 * the attach lands byte for byte in both images; SIGTERM stops every item and exits 0.
 * Broken files are refused by --check with exit 2 and FILE:LINE: KEY: what.
 */

import assert from "node:assert/strict";
import { allInSyncAndClean, waitForMirror } from "../helpers/array.ts";
import { assertSameBytes } from "../helpers/bytes.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import { exportImage, runDst, scenario, startDst } from "../helpers/spawn.ts";
import { missing, toolOk } from "../helpers/tools.ts";
import { scrape, value } from "../helpers/prometheus.ts";
import { formatHostPort } from "../../src/lib/address.ts";
import { waitUntil } from "../helpers/wait.ts";

const MiB = 1024 * 1024;

/** A port that was free a moment ago (the file must name fixed ports for the mirror). */
function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

/** The child processes of `pid` (Linux's /proc), to show that dst up starts none. */
async function childrenOf(pid: number): Promise<string[]> {
  const children: string[] = [];
  for await (const task of Deno.readDir(`/proc/${pid}/task`)) {
    const text = await Deno.readTextFile(`/proc/${pid}/task/${task.name}/children`);
    children.push(...text.split(" ").filter((one) => one.trim() !== ""));
  }
  return children;
}

async function refusesConnections(port: number): Promise<boolean> {
  try {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    conn.close();
    return false;
  } catch {
    return true;
  }
}

Deno.test({
  name: "dst up runs two exports, their mirror and its attach; SIGTERM stops them all",
  ignore: missing("nbdcopy") || missing("nbdinfo"),
  fn: () =>
    scenario("dst-up-", async (dir, track) => {
      const [a, b, mirror, nbd, bNbd] = [
        freePort(),
        freePort(),
        freePort(),
        freePort(),
        freePort(),
      ];
      const file = `${dir}/node.yaml`;
      await Deno.writeTextFile(
        file,
        `log: { level: info, format: json }
metrics: 127.0.0.1:0
exports:
  - path: ${dir}/a.img
    create: 4M
    listen: 127.0.0.1:${a}
  - path: ${dir}/b.img
    create: 4M
    listen: 127.0.0.1:${b}
    nbd: 127.0.0.1:${bNbd}
    nbd-threads: 2
arrays:
  - kind: mirror
    members: [127.0.0.1:${a}, 127.0.0.1:${b}]
    export: 127.0.0.1:${mirror}
    state: ${dir}/m0
attaches:
  - remote: 127.0.0.1:${mirror}
    listen: 127.0.0.1:${nbd}
`,
      );
      const up = track(
        await startDst(["up", file], /dst up: metrics at (\S+)\n[^]*dst up: running 4 items of /),
      );
      assert.deepEqual(await childrenOf(up.process.pid), [], "one process serves every item");
      await waitForMirror({ hostname: "127.0.0.1", port: mirror }, allInSyncAndClean, 10_000);
      const data = randomBytes(4 * MiB);
      await Deno.writeFile(`${dir}/data.bin`, data);
      await toolOk("nbdcopy", [`${dir}/data.bin`, `nbd://127.0.0.1:${nbd}`]);

      // One /metrics for the node: each item's series under its own label.
      const samples = await scrape(up.ready[1]!);
      assert.equal(value(samples, 'dst_client_write_bytes_total{item="attaches[0]"}'), 4 * MiB);
      assert.equal(value(samples, 'dst_export_write_bytes_total{item="arrays[0]"}'), 4 * MiB);
      // The first leg was the new mirror's source: it got the data and nothing else.
      assert.equal(value(samples, 'dst_export_write_bytes_total{item="exports[0]"}'), 4 * MiB);
      for (const leg of [a, b]) {
        assert.equal(
          value(
            samples,
            `dst_mirror_leg_state{item="arrays[0]",leg="127.0.0.1:${leg}",state="in-sync"}`,
          ),
          1,
        );
      }
      assert.ok(value(samples, "process_resident_memory_bytes") > 0);
      // An export's NBD threads log as that item too (the kernel spreads connections
      // among the threads: eight make it near sure that more than one takes some).
      for (let i = 0; i < 8; i++) await toolOk("nbdinfo", [`nbd://127.0.0.1:${bNbd}`]);

      const status = await up.stop("SIGTERM");
      assert.equal(status.code, 0, up.log());
      // JSON lines, each naming its item; the node's own lines name none.
      const lines = up.log().trimEnd().split("\n").map((line) => JSON.parse(line));
      const items = new Set(lines.map((line) => line.fields?.item));
      for (const item of ["exports[0]", "exports[1]", "arrays[0]", "attaches[0]"]) {
        assert.ok(items.has(item), `a line of ${item}:\n${up.log()}`);
      }
      // Every line but the node's own names its item, those of NBD threads included.
      for (const line of lines) {
        if (line.component === "up") continue;
        assert.ok(typeof line.fields?.item === "string", `no item: ${JSON.stringify(line)}`);
      }
      assert.ok(lines.some((line) => line.component === "up" && line.fields?.item === undefined));
      for (const port of [a, b, mirror, nbd]) {
        assert.ok(await refusesConnections(port), `port ${port} still listens:\n${up.log()}`);
      }
      assertSameBytes(await Deno.readFile(`${dir}/a.img`), data, "image a");
      assertSameBytes(await Deno.readFile(`${dir}/b.img`), data, "image b");
    }),
});

Deno.test("dst up exits 1 when an item fails to start, stopping those started", () =>
  scenario("dst-up-fail-", async (dir) => {
    const port = freePort();
    const taken = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const file = `${dir}/node.yaml`;
    await Deno.writeTextFile(
      file,
      `exports:
  - path: ${dir}/a.img
    create: 4M
    listen: 127.0.0.1:${port}
  - path: ${dir}/b.img
    create: 4M
    listen: 127.0.0.1:${(taken.addr as Deno.NetAddr).port}
`,
    );
    try {
      const run = await runDst(["up", file]);
      assert.equal(run.code, 1, run.stderr);
      assert.match(
        run.stderr,
        /node\.yaml: exports\[1\] \(dst export .*\): Cannot listen on 127\.0\.0\.1:\d+: .*; stopped the 1 item started before it/,
      );
    } finally {
      taken.close();
    }
    assert.ok(await refusesConnections(port), "the first export was stopped");
    await assert.rejects(Deno.stat(`${dir}/b.img`), Deno.errors.NotFound, "b.img was not made");
  }));

/** Each broken file and the exact message --check gives for it. */
const BROKEN: [string, string, string][] = [
  [
    "an unknown key",
    "exports:\n  - path: a.img\n    colour: red\n",
    "node.yaml:3: exports[0].colour: unknown key (allowed: path, listen, read-only, create, " +
    "nbd, nbd-threads, state, shared-writers, protect, allow, memory, key, metrics, log)",
  ],
  [
    "a bad port",
    "exports:\n  - path: a.img\n  - path: b.img\n    listen: ':99999'\n",
    'node.yaml:4: exports[1].listen: Cannot read address ":99999": "99999" is not a port ' +
    "(write HOST:PORT, e.g. 127.0.0.1:1025)",
  ],
  [
    "an export without path",
    "exports:\n  - create: 1G\n",
    "node.yaml:2: exports[0].path: missing; an export needs path: the image file or block " +
    "device to serve",
  ],
  [
    "a mirror that would start over from --source at every start",
    "arrays:\n  - kind: mirror\n    members: [a:1, b:1]\n    source: a:1\n    export: :1030\n",
    "node.yaml:4: arrays[0].source: a node file runs at every start, and --source starts the " +
    "mirror over from that member each time, discarding what it knows: make the mirror once " +
    "by hand (dst array mirror ... --source MEMBER), then let dst up reopen its state",
  ],
  [
    "a missing member",
    "arrays:\n  - kind: linear\n    members: [b:1025, /srv/gone.img]\n    export: :1030\n",
    "node.yaml:3: arrays[0].members[1]: /srv/gone.img does not exist (a local member is an " +
    "image file or block device)",
  ],
  [
    "a mirror of one member",
    "arrays:\n  - kind: mirror\n    members: [b:1025]\n    export: :1030\n",
    "node.yaml:3: arrays[0].members: a mirror needs at least 2 members",
  ],
  [
    "an image that is not there, without create",
    "exports:\n  - path: /srv/gone.img\n",
    "node.yaml:2: exports[0].path: /srv/gone.img does not exist; add create: SIZE to make it " +
    "(e.g. create: 10G)",
  ],
  [
    "two items on one port",
    "exports:\n  - path: a.img\n    create: 1M\n  - path: b.img\n    create: 1M\n",
    "node.yaml:4: exports[1].listen: port 1025 is exports[0].listen's too: give each its own " +
    "port (an export without listen takes 1025)",
  ],
  [
    "two arrays that are members of each other",
    "arrays:\n  - kind: linear\n    members: [127.0.0.1:2001]\n    export: :2002\n" +
    "  - kind: linear\n    members: [127.0.0.1:2002]\n    export: :2001\n",
    "node.yaml:3: arrays[0].members: arrays[0] and arrays[1] are members of each other, so " +
    "neither can start first: an array's member must be served by something that does not " +
    "need it",
  ],
  [
    "metrics given to one item",
    "exports:\n  - path: a.img\n    metrics: :9100\n",
    "node.yaml:3: exports[0].metrics: metrics is the node's, at the top of the file: dst up " +
    'serves one /metrics for all its items, each series labelled item="exports[0]" and so on',
  ],
  [
    "bad YAML",
    "exports:\n  - path: [a.img\n    create: 1G\n",
    "node.yaml:3: Flow sequence in block collection must be sufficiently indented and end " +
    "with a ]",
  ],
];

for (const [what, text, message] of BROKEN) {
  Deno.test(`dst up --check refuses ${what} with FILE:LINE: KEY: what, exit 2`, () =>
    scenario("dst-up-check-", async (dir) => {
      await Deno.writeTextFile(`${dir}/node.yaml`, text);
      const check = await runDst(["up", "--check", `${dir}/node.yaml`]);
      assert.equal(check.code, 2, check.stderr);
      assert.equal(check.stderr.trim(), `${dir}/${message}`);
    }));
}

Deno.test("dst up --check prints each item's command line, paths made the file's, and exits 0", () =>
  scenario("dst-up-ok-", async (dir) => {
    assert.equal((await runDst(["keygen", `${dir}/site.keys`, "--name", "site"])).code, 0);
    // Relative paths are the node file's, from whatever folder dst up runs in.
    await Deno.writeTextFile(
      `${dir}/node.yaml`,
      "key: site.keys\n" +
        "log: { format: json }\nmetrics: :9410\nexports:\n  - path: a.img\n" +
        "    create: 10G\n    read-only: false\n    state: ./state\nattaches:\n" +
        "  - remote: a:1030\n    read-only: true\n",
    );
    const check = await runDst(["up", "--check", `${dir}/node.yaml`]);
    assert.equal(check.code, 0, check.stderr);
    assert.equal(
      check.stdout,
      `exports[0]: dst export ${dir}/a.img --create 10G --state ${dir}/state --key ` +
        `${dir}/site.keys\n` +
        `attaches[0]: dst attach a:1030 --read-only --key ${dir}/site.keys\n` +
        `dst up: ${dir}/node.yaml is valid (2 items)\n`,
    );
    await assert.rejects(Deno.stat(`${dir}/a.img`), Deno.errors.NotFound, "--check makes nothing");
  }));

Deno.test("dst up refuses a file whose items their own commands refuse, every problem at once, and makes nothing", () =>
  scenario("dst-up-items-", async (dir) => {
    await Deno.writeTextFile(
      `${dir}/node.yaml`,
      `exports:\n  - path: ${dir}/made.img\n    create: 8M\n    listen: 127.0.0.1:0\n` +
        `  - path: ${dir}/tiny.img\n    create: 64\n    listen: 127.0.0.1:0\n` +
        `arrays:\n  - kind: linear\n    members: [127.0.0.1:1]\n    export: 127.0.0.1:0\n` +
        "    retries: many\n",
    );
    for (const args of [["up", "--check"], ["up"]]) {
      const run = await runDst([...args, `${dir}/node.yaml`]);
      assert.equal(run.code, 2, run.stderr);
      assert.equal(
        run.stderr.trim(),
        `${dir}/node.yaml:6: exports[1].create: --create 64 would make an image of 64 bytes: ` +
          "give a unit, e.g. --create 64G (K, M, G, T, P are binary multiples), or at least " +
          `1048576 bytes\n` +
          `${dir}/node.yaml:12: arrays[0].retries: --retries must be a whole number from 0 to ` +
          '1000, not "many"',
      );
    }
    await assert.rejects(Deno.stat(`${dir}/made.img`), Deno.errors.NotFound, "nothing was made");
  }));

Deno.test("dst up told twice to stop exits at once, though an item is stuck stopping", () =>
  scenario("dst-up-", async (dir, track) => {
    // An export of its own, which the node's attach flushes to as it stops.
    const server = track(await exportImage(dir, "disk.img", "1M"));
    await Deno.writeTextFile(
      `${dir}/node.yaml`,
      `attaches:\n  - remote: ${formatHostPort(server.address)}\n    listen: 127.0.0.1:0\n` +
        "    timeout: 1000\n    retries: 600\n",
    );
    const up = track(await startDst(["up", `${dir}/node.yaml`], /running 1 item of/));
    // The export stops answering: the attach's final flush waits for it (10 minutes).
    server.process.kill("SIGSTOP");
    try {
      up.process.kill("SIGTERM");
      const first = await Promise.race([
        up.process.status,
        new Promise((resolve) => setTimeout(() => resolve("still stopping"), 1000)),
      ]);
      assert.equal(first, "still stopping", up.log());
      up.process.kill("SIGTERM"); // the user insists
      assert.equal((await up.process.status).code, 130);
    } finally {
      server.process.kill("SIGCONT");
    }
  }));

Deno.test("dst up --metrics serves the node's metrics; on SIGHUP it goes on serving, and its keyed items reread their key files", () =>
  scenario("dst-up-hup-", async (dir, track) => {
    const keys = `${dir}/site.keys`;
    assert.equal((await runDst(["keygen", keys, "--name", "first"])).code, 0);
    const port = freePort();
    await Deno.writeTextFile(
      `${dir}/node.yaml`,
      `key: ${keys}\nexports:\n  - path: ${dir}/a.img\n    create: 1M\n` +
        `    listen: 127.0.0.1:${port}\n`,
    );
    const up = track(
      await startDst(
        ["up", `${dir}/node.yaml`, "--metrics", "127.0.0.1:0"],
        /dst up: metrics at (\S+)\n[^]*running 1 item of/,
      ),
    );
    // --metrics on the command line: the node's one /metrics, without metrics: in the file.
    assert.equal(value(await scrape(up.ready[1]!), 'dst_export_clients{item="exports[0]"}'), 0);
    const status = (name: string) =>
      runDst(["status", `127.0.0.1:${port}`, "--key", keys, "--key-name", name]);
    assert.equal((await status("second")).code, 1, "a key not in the file yet");
    assert.equal((await runDst(["keygen", keys, "--name", "second"])).code, 0);
    up.process.kill("SIGHUP");
    await waitUntil(
      async () => (await status("second")).code === 0,
      "the export takes the key added",
      { timeoutMs: 5_000, everyMs: 100 },
    );
    const stopped = await up.stop("SIGTERM");
    assert.equal(stopped.code, 0, up.log());
    assert.match(up.log(), /SIGHUP: reread .*site\.keys.*added second.* item=exports\[0\]/);
  }));

Deno.test("dst up told to stop while an item is still starting stops those serving, and exits 0", () =>
  scenario("dst-up-starting-", async (dir, track) => {
    // A member that takes the connection (the kernel queues it) and never answers: the
    // array's start waits for its handshake.
    const silent = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const port = freePort();
    try {
      await Deno.writeTextFile(
        `${dir}/node.yaml`,
        `exports:\n  - path: ${dir}/a.img\n    create: 1M\n    listen: 127.0.0.1:${port}\n` +
          `arrays:\n  - kind: linear\n    members: [127.0.0.1:${port}, ` +
          `127.0.0.1:${silent.addr.port}]\n    export: 127.0.0.1:0\n`,
      );
      const up = track(
        await startDst(["up", `${dir}/node.yaml`], /exports\[0\]: dst export: serving/),
      );
      const status = await up.stop("SIGTERM");
      assert.equal(status.code, 0, up.log());
      assert.match(up.log(), /arrays\[0\] was still starting: left to the exit/);
      assert.match(up.log(), /stopped cleanly item=exports\[0\]/);
      assert.ok(await refusesConnections(port), "the export was stopped");
    } finally {
      silent.close();
    }
  }));
