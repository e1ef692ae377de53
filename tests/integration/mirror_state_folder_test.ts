/**
 * Where a mirror's state is and when it is thrown away, with the real CLI: --source
 * over a state folder that holds a mirror's state is refused (the state untouched)
 * unless --force, which starts over; without --state the folder is found by the legs'
 * export ids, so the same legs find the same state however they are spelled or
 * ordered, and a folder named the old way (by the member list) is still found.
 */

import assert from "node:assert/strict";
import {
  allInSyncAndClean,
  memberName,
  type RunningArray,
  startArray,
  startNewMirror,
  waitForMirror,
} from "../helpers/array.ts";
import { exportImage, runDst, scenario, TEST_STATE_HOME } from "../helpers/spawn.ts";
import { sha256Hex } from "../../src/lib/hex.ts";

/** The state folder a mirror names in its start-up line. */
function stateOf(mirror: RunningArray): string {
  const found = /, state (\S+)\)/.exec(mirror.line);
  assert.ok(found, `no state folder in the start-up line: ${mirror.line}`);
  return found[1]!;
}

async function arrayIdIn(state: string): Promise<string> {
  return (JSON.parse(await Deno.readTextFile(`${state}/state.json`)) as { arrayId: string })
    .arrayId;
}

Deno.test("--source over a mirror's state is refused, the state untouched; --force starts over", () =>
  scenario("dst-state-source-", async (dir, track) => {
    const a = track(await exportImage(dir, "a.img", "4M"));
    const b = track(await exportImage(dir, "b.img", "4M"));
    const legs = [memberName(a.address), memberName(b.address)];
    const state = `${dir}/state`;
    const first = track(await startNewMirror(legs, state));
    await waitForMirror(first.address, allInSyncAndClean, 10_000);
    await first.stop();
    const before = {
      state: await Deno.readFile(`${state}/state.json`),
      bitmap: await Deno.readFile(`${state}/bitmap`),
    };

    const args = ["mirror", ...legs, "--source", legs[1]!, "--state", state];
    const refused = await runDst(["array", ...args, "--export", "127.0.0.1:0"]);
    assert.equal(refused.code, 1, refused.stderr);
    assert.doesNotMatch(refused.stdout, /serving/);
    assert.match(refused.stderr, new RegExp(`start over with a full copy from ${legs[1]}`));
    assert.match(refused.stderr, /which legs are in sync, the dirty regions/);
    assert.match(refused.stderr, /add --force/);
    assert.deepEqual(await Deno.readFile(`${state}/state.json`), before.state, "state.json");
    assert.deepEqual(await Deno.readFile(`${state}/bitmap`), before.bitmap, "bitmap");

    const forced = track(await startArray([...args, "--force", "--export", "127.0.0.1:0"]));
    await waitForMirror(forced.address, allInSyncAndClean, 10_000);
    await forced.stop();
    assert.notEqual(
      await arrayIdIn(state),
      JSON.parse(new TextDecoder().decode(before.state)).arrayId,
      "--force made a new mirror state",
    );
  }));

Deno.test("--force without --source is refused as bad usage", async () => {
  const result = await runDst(
    ["array", "mirror", "127.0.0.1:1", "127.0.0.1:2", "--force", "--export", "127.0.0.1:0"],
  );
  assert.equal(result.code, 2, result.stderr);
  assert.match(result.stderr, /--force goes with --source/);
});

Deno.test("without --state, the same legs spelled another way or in another order find the same state", () =>
  scenario("dst-state-default-", async (dir, track) => {
    const a = track(await exportImage(dir, "a.img", "4M"));
    const b = track(await exportImage(dir, "b.img", "4M"));
    const [nameA, nameB] = [memberName(a.address), memberName(b.address)];
    const first = track(await startArray(["mirror", nameA, nameB, "--export", "127.0.0.1:0"]));
    await waitForMirror(first.address, allInSyncAndClean, 10_000);
    assert.match(first.log(), /new mirror:/);
    const state = stateOf(first);
    const arrayId = await arrayIdIn(state);
    await first.stop();

    let named = [nameA, nameB];
    for (
      const members of [
        [`localhost:${a.address.port}`, `localhost:${b.address.port}`],
        [nameB, nameA],
        [`localhost:${b.address.port}`, nameA],
      ]
    ) {
      const again = track(await startArray(["mirror", ...members, "--export", "127.0.0.1:0"]));
      await waitForMirror(again.address, allInSyncAndClean, 10_000);
      assert.equal(stateOf(again), state, `${members.join(" ")}: the same state folder`);
      assert.doesNotMatch(again.log(), /new mirror:|full copy/, members.join(" "));
      // The legs take the names given now: that is how the status shows them.
      for (const member of members.filter((m) => !named.includes(m))) {
        assert.match(again.log(), new RegExp(`is ${member} now \\(the same export`));
      }
      named = members;
      await again.stop();
      assert.equal(await arrayIdIn(state), arrayId, `${members.join(" ")}: the same mirror`);
    }
  }));

Deno.test("without --state, a mirror's state in a folder named the old way (by the member list) is still found", () =>
  scenario("dst-state-legacy-", async (dir, track) => {
    const a = track(await exportImage(dir, "a.img", "4M"));
    const b = track(await exportImage(dir, "b.img", "4M"));
    const legs = [memberName(a.address), memberName(b.address)];
    // Where a mirror without --state kept its state before states were found by leg ids.
    const digest = await sha256Hex(`mirror\n${legs.join("\n")}`);
    const old = `${TEST_STATE_HOME}/dst/arrays/mirror-${digest.slice(0, 16)}`;
    const first = track(await startNewMirror(legs, old));
    await waitForMirror(first.address, allInSyncAndClean, 10_000);
    const arrayId = await arrayIdIn(old);
    await first.stop();

    const again = track(await startArray(["mirror", ...legs, "--export", "127.0.0.1:0"]));
    await waitForMirror(again.address, allInSyncAndClean, 10_000);
    assert.equal(stateOf(again), old);
    assert.doesNotMatch(again.log(), /new mirror:|full copy/);
    await again.stop();
    assert.equal(await arrayIdIn(old), arrayId);
  }));
