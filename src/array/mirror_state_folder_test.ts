/**
 * Finding a mirror's state folder when more than one folder is for the same legs (a
 * mirror made under the member-list naming, then, after a leg's image was replaced,
 * again under the export-id naming): with every leg up the folder of their ids is
 * taken; with a leg down its id is unknown, so which state is current cannot be told,
 * and the mirror refuses rather than reopening a stale one (which would later copy the
 * stale leg over writes acknowledged since).
 */

import assert from "node:assert/strict";
import { findMirrorStateDir } from "./mirror_state_folder.ts";
import { legIdsStateDir, memberListStateDir } from "./mirror_state.ts";
import { silentLogger } from "../lib/log.ts";

const X = "a".repeat(32);
const Y_OLD = "b".repeat(32);
const Y_NEW = "c".repeat(32);
const MEMBERS = ["a:1025", "b:1025"];

function state(arrayId: string, yId: string): string {
  return JSON.stringify({
    version: 1,
    kind: "mirror",
    arrayId,
    sizeBytes: 1 << 24,
    regionBytes: 1 << 20,
    legs: [
      { slot: 0, name: "a:1025", exportId: X, generation: 5, state: "in-sync" },
      { slot: 1, name: "b:1025", exportId: yId, generation: 5, state: "in-sync" },
    ],
  });
}

Deno.test("a mirror state folder: two states for the same legs and a leg down is refused, not guessed", async () => {
  const root = await Deno.makeTempDir({ prefix: "dst-state-folder-" });
  const before = Deno.env.get("XDG_STATE_HOME");
  Deno.env.set("XDG_STATE_HOME", root);
  try {
    const legacy = await memberListStateDir(MEMBERS);
    const live = await legIdsStateDir([X, Y_NEW]);
    for (
      const [dir, text] of [[legacy, state("1".repeat(32), Y_OLD)], [
        live,
        state("2".repeat(32), Y_NEW),
      ]]
    ) {
      await Deno.mkdir(dir!, { recursive: true });
      await Deno.writeTextFile(`${dir}/state.json`, text!);
    }
    const up = await findMirrorStateDir(
      MEMBERS,
      (member) => Promise.resolve(member === "a:1025" ? X : Y_NEW),
      silentLogger,
    );
    assert.equal(up.dir, live, "every leg up: the folder of their ids");
    await assert.rejects(
      findMirrorStateDir(
        MEMBERS,
        (member) => member === "a:1025" ? Promise.resolve(X) : Promise.reject(new Error("down")),
        silentLogger,
      ),
      /More than one mirror state is for the legs a:1025, b:1025: .*Say which with --state DIR/,
    );
  } finally {
    if (before === undefined) Deno.env.delete("XDG_STATE_HOME");
    else Deno.env.set("XDG_STATE_HOME", before);
    await Deno.remove(root, { recursive: true });
  }
});
