/**
 * What a mirror refuses, with the real CLI: a second array on a state folder that
 * another one holds (it exits at once, naming the holder's process, and opens no leg);
 * a CONTROL attach that names a local path (the array never opens a file named over
 * the network); its own export as a leg; the same export named twice.
 */

import assert from "node:assert/strict";
import { assertSameBytes } from "../helpers/bytes.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import { memberName, mirrorStatus, startNewMirror, waitForMirror } from "../helpers/array.ts";
import { exportImage, runDst, scenario } from "../helpers/spawn.ts";
import { RemoteDevice } from "../../src/client/remote_device.ts";
import type { HostPort } from "../../src/lib/address.ts";
import { silentLogger as quiet } from "../../src/lib/log.ts";

async function generationOf(address: HostPort): Promise<number> {
  const device = await RemoteDevice.connect(address, { writer: false, log: quiet });
  try {
    return ((await device.queryStatus()) as { writeGeneration: number }).writeGeneration;
  } finally {
    await device.close();
  }
}

const inSync = (s: { members: Array<{ state: string }> }) =>
  s.members.every((m) => m.state === "in-sync");

Deno.test("a second array on a state folder in use exits at once, naming the holder, and opens no leg", () =>
  scenario("dst-guard-lock-", async (dir, track) => {
    const a = track(
      await exportImage(dir, "a.img", "4M"),
    );
    const b = track(
      await exportImage(dir, "b.img", "4M"),
    );
    const legs = [memberName(a.address), memberName(b.address)];
    const first = track(await startNewMirror(legs, `${dir}/state`));
    await waitForMirror(first.address, inSync, 10_000);
    const generations = [await generationOf(a.address), await generationOf(b.address)];

    const second = await runDst([
      "array",
      "mirror",
      ...legs,
      "--state",
      `${dir}/state`,
      "--export",
      "127.0.0.1:0",
    ]);
    assert.notEqual(second.code, 0);
    assert.match(
      second.stderr,
      new RegExp(`in use by another dst array \\(process ${first.process.pid}\\)`),
    );
    assert.match(second.stderr, /give this one another --state/);
    assert.deepEqual(
      [await generationOf(a.address), await generationOf(b.address)],
      generations,
      "the second array opened no leg",
    );
    assert.ok(inSync(await mirrorStatus(first.address)), "the first one serves on, in sync");
  }));

Deno.test("CONTROL never opens a local path: attach of a file over the network is refused, the file untouched", () =>
  scenario("dst-guard-control-", async (dir, track) => {
    const a = track(
      await exportImage(dir, "a.img", "4M"),
    );
    const b = track(
      await exportImage(dir, "b.img", "4M"),
    );
    const mirror = track(
      await startNewMirror([memberName(a.address), memberName(b.address)], `${dir}/state`),
    );
    await waitForMirror(mirror.address, inSync, 10_000);
    const victim = `${dir}/victim.img`;
    const content = randomBytes(4 * 1024 * 1024);
    await Deno.writeFile(victim, content);

    const attach = await runDst(["array", "attach", memberName(mirror.address), victim]);
    assert.notEqual(attach.code, 0);
    assert.match(attach.stderr, /is a local path: attach takes a DST export's HOST:PORT/);
    assertSameBytes(await Deno.readFile(victim), content, "the file named over the network");
    assert.equal((await mirrorStatus(mirror.address)).members.length, 2);
  }));

Deno.test("a mirror refuses its own export as a leg, on the command line and over CONTROL", () =>
  scenario("dst-guard-self-", async (dir, track) => {
    const a = track(
      await exportImage(dir, "a.img", "4M"),
    );
    const b = track(
      await exportImage(dir, "b.img", "4M"),
    );
    // A port that is free now: the array is told to serve there and to use it as a leg.
    const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const port = (probe.addr as Deno.NetAddr).port;
    probe.close();
    const itself = `127.0.0.1:${port}`;
    const own = await runDst([
      "array",
      "mirror",
      memberName(a.address),
      itself,
      "--source",
      memberName(a.address),
      "--state",
      `${dir}/state-own`,
      "--export",
      itself,
    ]);
    assert.equal(own.code, 2, own.stderr);
    assert.match(own.stderr, /is this array's own --export/);

    const mirror = track(
      await startNewMirror([memberName(a.address), memberName(b.address)], `${dir}/state`),
    );
    await waitForMirror(mirror.address, inSync, 10_000);
    // Through an alias the command-line check cannot see: the export id gives it away.
    const alias = `localhost:${mirror.address.port}`;
    const attach = await runDst(["array", "attach", memberName(mirror.address), alias]);
    assert.notEqual(attach.code, 0);
    assert.match(attach.stderr, /own export: a mirror cannot be its own leg/);
    assert.equal((await mirrorStatus(mirror.address)).members.length, 2);
  }));

Deno.test("a mirror refuses the same export named twice", () =>
  scenario("dst-guard-twice-", async (dir, track) => {
    const a = track(
      await exportImage(dir, "a.img", "4M"),
    );
    const twice = await runDst([
      "array",
      "mirror",
      memberName(a.address),
      `localhost:${a.address.port}`,
      "--source",
      memberName(a.address),
      "--state",
      `${dir}/state`,
      "--export",
      "127.0.0.1:0",
    ]);
    assert.notEqual(twice.code, 0);
    assert.match(twice.stderr, /are the same export/);
  }));

Deno.test("detach refuses a leg that is not in sync, unless --force, which says the copy is not consistent", () =>
  scenario("dst-guard-detach-", async (dir, track) => {
    const a = track(
      await exportImage(dir, "a.img", "4M"),
    );
    const b = track(
      await exportImage(dir, "b.img", "4M"),
    );
    const [nameA, nameB] = [memberName(a.address), memberName(b.address)];
    const mirror = track(
      await startNewMirror([nameA, nameB], `${dir}/state`, "--timeout", "300", "--retries", "1"),
    );
    await waitForMirror(mirror.address, inSync, 10_000);
    await b.stop("SIGKILL");
    const client = await RemoteDevice.connect(mirror.address, { log: quiet });
    await client.write(0, randomBytes(4096)); // B misses it and goes out of sync
    await client.close();
    await waitForMirror(mirror.address, (s) => s.members[1]!.state === "out-of-sync", 5_000);

    const refused = await runDst(["array", "detach", memberName(mirror.address), nameB]);
    assert.notEqual(refused.code, 0);
    assert.match(refused.stderr, /is out-of-sync: its data is not a consistent copy/);
    assert.match(refused.stderr, /--force/);
    assert.equal((await mirrorStatus(mirror.address)).members[1]!.state, "out-of-sync");

    const forced = await runDst(["array", "detach", memberName(mirror.address), nameB, "--force"]);
    assert.equal(forced.code, 0, forced.stderr);
    assert.match(forced.stdout, /NOT a consistent copy/);
    assert.equal((await mirrorStatus(mirror.address)).members[1]!.state, "detached");
  }));
