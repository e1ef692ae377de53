/**
 * A new mirror without --source, with the real CLI: it picks its source from what the
 * legs' write generations say, never by guessing. Two fresh legs: the first is the
 * source. One leg written before: that one is. Both written: refused, naming both,
 * with the --source line to type. In every started case the legs end identical and
 * hold the source's data.
 */

import assert from "node:assert/strict";
import { RemoteDevice } from "../../src/client/remote_device.ts";
import type { HostPort } from "../../src/lib/address.ts";
import { assertSameBytes } from "../helpers/bytes.ts";
import { allInSyncAndClean, memberName, startArray, waitForMirror } from "../helpers/array.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import { exportImage, runDst, type RunningDst, scenario, startExport } from "../helpers/spawn.ts";
import { silentLogger as quiet } from "../../src/lib/log.ts";

const MiB = 1024 * 1024;

async function writeTo(address: HostPort, data: Uint8Array): Promise<void> {
  const device = await RemoteDevice.connect(address, { log: quiet });
  await device.write(0, data);
  await device.flush();
  await device.close();
}

async function twoLegs(dir: string, track: <T extends RunningDst>(running: T) => T) {
  const a = track(await exportImage(dir, "a.img", "4M"));
  const b = track(await exportImage(dir, "b.img", "4M"));
  return { a, b, legs: [memberName(a.address), memberName(b.address)] };
}

Deno.test("the README's three-node command on two fresh legs starts, the first leg the source", () =>
  scenario("dst-new-fresh-", async (dir, track) => {
    const { legs } = await twoLegs(dir, track);
    const mirror = track(await startArray(["mirror", ...legs, "--export", "127.0.0.1:0"]));
    await waitForMirror(mirror.address, allInSyncAndClean, 10_000);
    assert.match(mirror.log(), new RegExp(`no leg was ever written; ${legs[0]}, the first`));
    await mirror.stop();
    assertSameBytes(
      await Deno.readFile(`${dir}/a.img`),
      await Deno.readFile(`${dir}/b.img`),
      "legs",
    );
  }));

Deno.test("a new mirror whose one leg was written takes that leg as the source", () =>
  scenario("dst-new-one-", async (dir, track) => {
    const { b, legs } = await twoLegs(dir, track);
    const data = randomBytes(4 * MiB);
    await writeTo(b.address, data);
    const mirror = track(
      await startArray(["mirror", ...legs, "--state", `${dir}/state`, "--export", "127.0.0.1:0"]),
    );
    await waitForMirror(mirror.address, allInSyncAndClean, 10_000);
    assert.match(mirror.log(), new RegExp(`${legs[1]} is the source, the only leg that was ever`));
    await mirror.stop();
    assertSameBytes(await Deno.readFile(`${dir}/a.img`), data, "leg A got B's data");
    assertSameBytes(await Deno.readFile(`${dir}/b.img`), data, "leg B kept its data");
  }));

Deno.test("a new mirror whose legs were both written is refused, naming them and the line to type", () =>
  scenario("dst-new-both-", async (dir, track) => {
    const { a, b, legs } = await twoLegs(dir, track);
    const dataA = randomBytes(4 * MiB);
    const dataB = randomBytes(4 * MiB);
    await writeTo(a.address, dataA);
    await writeTo(b.address, dataB);
    const refused = await runDst(
      ["array", "mirror", ...legs, "--state", `${dir}/state`, "--export", "127.0.0.1:0"],
    );
    assert.equal(refused.code, 1, refused.stderr);
    assert.match(
      refused.stderr,
      new RegExp(`more than one leg was written before \\(${legs[0]}, ${legs[1]}\\)`),
    );
    assert.match(
      refused.stderr,
      new RegExp(`dst array mirror ${legs[0]} ${legs[1]} --source ${legs[0]} --state`),
    );
    await a.stop();
    await b.stop();
    assertSameBytes(await Deno.readFile(`${dir}/a.img`), dataA, "leg A untouched");
    assertSameBytes(await Deno.readFile(`${dir}/b.img`), dataB, "leg B untouched");
  }));

Deno.test("a new mirror never overwrites a leg that holds data no DST writer wrote, without --source", () =>
  scenario("dst-new-outside-", async (dir, track) => {
    // B was filled outside DST (as mkfs or dd would): its export's state is new.
    const outside = randomBytes(4 * MiB);
    await Deno.writeFile(`${dir}/b.img`, outside);
    const a = track(await exportImage(dir, "a.img", "4M"));
    const b = track(await startExport([`${dir}/b.img`, "--listen", "127.0.0.1:0"]));
    const legs = [memberName(a.address), memberName(b.address)];
    const refused = await runDst(
      ["array", "mirror", ...legs, "--state", `${dir}/state`, "--export", "127.0.0.1:0"],
    );
    assert.equal(refused.code, 1, refused.stderr);
    assert.match(refused.stderr, new RegExp(`${legs[1]} holds data \\(not all zeroes\\)`));
    assert.match(refused.stderr, /--source/);
    await b.stop();
    assertSameBytes(await Deno.readFile(`${dir}/b.img`), outside, "B untouched");
  }));
