/**
 * The last in-sync leg stays in sync, with the real CLI: when both legs' exports go
 * away one after the other, the second never leaves sync; the array answers EIO while
 * it is away and serves again, by itself, once it is back; the other leg then catches
 * up and both end equal to what was acknowledged. A mirror restarted while that leg
 * is unreachable names it as the one holding the newest data.
 */

import assert from "node:assert/strict";
import { RemoteDevice } from "../../src/client/remote_device.ts";
import { DeviceError } from "../../src/lib/errors.ts";
import {
  allInSyncAndClean,
  leg,
  memberName,
  startNewMirror,
  waitForMirror,
} from "../helpers/array.ts";
import { assertSameBytes } from "../helpers/bytes.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import { runDst, type RunningExport, scenario, startExport } from "../helpers/spawn.ts";
import { silentLogger as quiet } from "../../src/lib/log.ts";

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;

function exportAt(dir: string, name: string, port = 0): Promise<RunningExport> {
  const args = [`${dir}/${name}.img`, "--listen", `127.0.0.1:${port}`];
  return startExport(port === 0 ? [...args, "--create", "4M"] : args);
}

/** Writes `data` at `offset`, trying again until it is acknowledged or `ms` passed. */
async function writeWhenBack(
  client: RemoteDevice,
  offset: number,
  data: Uint8Array,
  ms: number,
): Promise<void> {
  const until = performance.now() + ms;
  for (;;) {
    try {
      await client.write(offset, data);
      return;
    } catch (error) {
      if (performance.now() > until) throw error;
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  }
}

Deno.test("the last in-sync leg never leaves sync: EIO while it is away, service again once it is back", () =>
  scenario("dst-last-leg-", async (dir, track) => {
    let a = track(await exportAt(dir, "a"));
    let b = track(await exportAt(dir, "b"));
    const [nameA, nameB] = [memberName(a.address), memberName(b.address)];
    const mirror = track(
      await startNewMirror([nameA, nameB], `${dir}/state`, "--timeout", "300", "--retries", "1"),
    );
    await waitForMirror(mirror.address, allInSyncAndClean, 10_000);
    const client = await RemoteDevice.connect(mirror.address, { log: quiet });
    const model = new Uint8Array(SIZE);
    try {
      const first = randomBytes(MiB);
      await client.write(0, first);
      model.set(first, 0);

      // B goes: the mirror runs degraded on A.
      await b.stop("SIGKILL");
      const second = randomBytes(MiB);
      await writeWhenBack(client, MiB, second, 5_000);
      model.set(second, MiB);
      await waitForMirror(mirror.address, (s) => leg(s, nameB).state === "out-of-sync", 5_000);

      // A, the last in-sync leg, goes too: it stays in sync, and writes fail with EIO.
      await a.stop("SIGKILL");
      await assert.rejects(
        client.write(2 * MiB, randomBytes(4096)),
        (e) => e instanceof DeviceError && e.errno === "EIO",
      );
      const away = await waitForMirror(mirror.address, (s) => leg(s, nameA).reason !== undefined);
      assert.equal(leg(away, nameA).state, "in-sync", "the last leg never leaves sync");
      assert.equal(leg(away, nameB).state, "out-of-sync");

      // A comes back: the array serves again by itself, no restart.
      a = track(await exportAt(dir, "a", a.address.port));
      const third = randomBytes(MiB);
      await writeWhenBack(client, 2 * MiB, third, 10_000);
      model.set(third, 2 * MiB);
      const back = new Uint8Array(SIZE);
      await client.read(0, back);
      assertSameBytes(back, model, "read through the mirror once A is back");

      // B comes back and catches up from A.
      b = track(await exportAt(dir, "b", b.address.port));
      await waitForMirror(mirror.address, allInSyncAndClean, 15_000);
      // A came back from a restart with writes it had not flushed; the mirror cannot
      // tell a restart from a power loss, so the next flush says they may be lost, once.
      await assert.rejects(client.flush(), (e) => e instanceof DeviceError && e.errno === "EIO");
      await client.flush();
    } finally {
      await client.close();
    }
    assert.equal((await mirror.stop()).code, 0, mirror.log());
    await a.stop();
    await b.stop();
    assertSameBytes(await Deno.readFile(`${dir}/a.img`), model, "leg A");
    assertSameBytes(await Deno.readFile(`${dir}/b.img`), model, "leg B");
  }));

Deno.test("a mirror restarted while its in-sync leg is unreachable names that leg as the newest", () =>
  scenario("dst-last-leg-restart-", async (dir, track) => {
    const a = track(await exportAt(dir, "a"));
    const b = track(await exportAt(dir, "b"));
    const [nameA, nameB] = [memberName(a.address), memberName(b.address)];
    const state = `${dir}/state`;
    const mirror = track(
      await startNewMirror([nameA, nameB], state, "--timeout", "300", "--retries", "1"),
    );
    await waitForMirror(mirror.address, allInSyncAndClean, 10_000);
    await b.stop("SIGKILL");
    const client = await RemoteDevice.connect(mirror.address, { log: quiet });
    await writeWhenBack(client, 0, randomBytes(MiB), 5_000);
    await client.close();
    await waitForMirror(mirror.address, (s) => leg(s, nameB).state === "out-of-sync", 5_000);
    await mirror.stop();
    await a.stop("SIGKILL");
    track(await exportAt(dir, "b", b.address.port)); // only the stale leg is reachable

    const again = await runDst([
      "array",
      "mirror",
      nameA,
      nameB,
      "--state",
      state,
      "--export",
      "127.0.0.1:0",
      "--timeout",
      "300",
      "--retries",
      "0",
    ]);
    assert.notEqual(again.code, 0);
    assert.match(again.stderr, new RegExp(`${nameA} holds the newest data: start its export`));
    assert.match(again.stderr, new RegExp(`--source ${nameB} --state ${state}`));
  }));
