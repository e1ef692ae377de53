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
import { runDst, scenario, startDst } from "../helpers/spawn.ts";
import { missing, toolOk } from "../helpers/tools.ts";

const MiB = 1024 * 1024;

/** A port that was free a moment ago (the file must name fixed ports for the mirror). */
function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
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
  ignore: missing("nbdcopy"),
  fn: () =>
    scenario("dst-up-", async (dir, track) => {
      const [a, b, mirror, nbd] = [freePort(), freePort(), freePort(), freePort()];
      const file = `${dir}/node.yaml`;
      await Deno.writeTextFile(
        file,
        `log: { level: info }
exports:
  - path: ${dir}/a.img
    create: 4M
    listen: 127.0.0.1:${a}
  - path: ${dir}/b.img
    create: 4M
    listen: 127.0.0.1:${b}
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
      const up = track(await startDst(["up", file], /dst up: running 4 items of /));
      await waitForMirror({ hostname: "127.0.0.1", port: mirror }, allInSyncAndClean, 10_000);
      const data = randomBytes(4 * MiB);
      await Deno.writeFile(`${dir}/data.bin`, data);
      await toolOk("nbdcopy", [`${dir}/data.bin`, `nbd://127.0.0.1:${nbd}`]);

      const status = await up.stop("SIGTERM");
      assert.equal(status.code, 0, up.log());
      assert.match(up.log(), /attaches\[0\]: /);
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
    const file = `${dir}/node.yaml`;
    await Deno.writeTextFile(
      file,
      `exports:
  - path: ${dir}/a.img
    create: 4M
    listen: 127.0.0.1:${port}
  - path: ${dir}/missing.img
    listen: 127.0.0.1:0
`,
    );
    const run = await runDst(["up", file]);
    assert.equal(run.code, 1, run.stderr);
    assert.match(run.stderr, /exports\[1\]: .*missing\.img does not exist/);
    assert.match(run.stderr, /exports\[1\] \(dst export .*\) exited 1 before it was ready/);
    assert.ok(await refusesConnections(port), "the first export was stopped");
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
    "arrays:\n  - kind: mirror\n    members: [a:1, b:1]\n    source: a:1\n",
    "node.yaml:4: arrays[0].source: a node file runs at every start, and --source starts the " +
    "mirror over from that member each time, discarding what it knows: make the mirror once " +
    "by hand (dst array mirror ... --source MEMBER), then let dst up reopen its state",
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

Deno.test("dst up --check prints each item's command line and exits 0", () =>
  scenario("dst-up-ok-", async (dir) => {
    await Deno.writeTextFile(
      `${dir}/node.yaml`,
      "key: site.keys\nexports:\n  - path: a.img\n    create: 10G\n    read-only: false\n" +
        "attaches:\n  - remote: a:1030\n    read-only: true\n    log: { format: json }\n",
    );
    const check = await runDst(["up", "--check", `${dir}/node.yaml`]);
    assert.equal(check.code, 0, check.stderr);
    assert.equal(
      check.stdout,
      "exports[0]: dst export a.img --create 10G --key site.keys\n" +
        "attaches[0]: dst attach a:1030 --read-only --key site.keys --log-format json\n" +
        `dst up: ${dir}/node.yaml is valid (2 items)\n`,
    );
  }));

/** Whether a process whose command line contains `text` is running. */
async function running(text: string): Promise<boolean> {
  const found = await new Deno.Command("pgrep", { args: ["-f", text], stdout: "null" }).output();
  return found.code === 0;
}

Deno.test({
  name: "dst up told twice to stop leaves no item running, though one is stuck stopping",
  ignore: missing("pgrep"),
  fn: () =>
    scenario("dst-up-", async (dir, track) => {
      const [a, b] = [freePort(), freePort()];
      await Deno.writeTextFile(
        `${dir}/node.yaml`,
        `exports:\n  - path: ${dir}/first.img\n    create: 1M\n    listen: "127.0.0.1:${a}"\n` +
          `    state: ${dir}/s1\n  - path: ${dir}/second.img\n    create: 1M\n` +
          `    listen: "127.0.0.1:${b}"\n    state: ${dir}/s2\n`,
      );
      const up = track(await startDst(["up", `${dir}/node.yaml`], /running 2 items/));
      // The last item, stopped first, does not stop: a final flush that never ends, say.
      const stuck = await new Deno.Command("pkill", { args: ["-STOP", "-f", `${dir}/second.img`] })
        .output();
      assert.equal(stuck.code, 0);
      up.process.kill("SIGTERM");
      await new Promise((resolve) => setTimeout(resolve, 500));
      up.process.kill("SIGTERM"); // the user insists
      const status = await up.process.status;
      assert.equal(status.code, 130);
      for (const image of ["first.img", "second.img"]) {
        for (let i = 0; i < 50 && await running(`${dir}/${image}`); i++) {
          await new Promise((resolve) => setTimeout(resolve, 100));
        }
        assert.equal(await running(`${dir}/${image}`), false, `${image}'s export still runs`);
      }
    }),
});
