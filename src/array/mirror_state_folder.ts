/**
 * Finding a mirror's default state folder (no --state): by its legs' export ids, so the
 * same legs find the same state however the members are spelled ("127.0.0.1:1025" or
 * "localhost:1025") or ordered.
 *
 * Owns: looking through the folders under mirrorStatesRoot() for a state whose legs are
 * these, and naming a new mirror's folder. Does not own: asking the members for their
 * ids (members.ts, through the seam `identify`), or what a folder holds
 * (mirror_store.ts).
 *
 * Why a folder is found by what its state says, not only by its name: a leg that is
 * down at start has no id to hash, a folder named the old way (by the member list)
 * must still be found, and a state whose legs changed (attach) keeps its folder.
 */

import { DstError } from "../lib/errors.ts";
import type { Logger } from "../lib/log.ts";
import { readStateFile } from "../lib/state_file.ts";
import {
  legIdsStateDir,
  matchLegs,
  memberListStateDir,
  mirrorStatesRoot,
  parseMirrorState,
} from "./mirror_state.ts";

/** The default state folder of a mirror of `members`, and their ids (null: unreachable). */
export interface FoundStateDir {
  dir: string;
  exportIds: Array<string | null>;
}

/**
 * The state folder of the mirror of `members`: the one under mirrorStatesRoot() whose
 * state is for these legs (matchLegs), or, when none is, a new one named from their
 * ids. `identify` gives a member's export id without writing to it.
 */
export async function findMirrorStateDir(
  members: readonly string[],
  identify: (member: string) => Promise<string>,
  log: Logger,
): Promise<FoundStateDir> {
  const asked = await Promise.all(members.map(async (member) => {
    try {
      return await identify(member);
    } catch (error) {
      return error instanceof Error ? error : new Error(String(error));
    }
  }));
  const exportIds = asked.map((a) => typeof a === "string" ? a : null);
  const known = exportIds.filter((id) => id !== null);
  const byIds = known.length === members.length ? await legIdsStateDir(known) : null;
  const byList = await memberListStateDir(members);

  const found = statesFor(members, exportIds, [byIds, byList]);
  // The same legs in more than one folder (a mirror made twice, under the member-list
  // naming and then under the ids'): the folder of their ids, when every id is known.
  // With a leg down its id is not, and a stale state cannot be told from the current
  // one; reopening the stale one would later copy a stale leg over acknowledged writes,
  // so only the user can say.
  const dir = found.length === 1
    ? found[0]!
    : byIds !== null && found.includes(byIds)
    ? byIds
    : null;
  if (found.length > 1 && dir === null) {
    throw new DstError(
      "STATE",
      `More than one mirror state is for the legs ${members.join(", ")}: ` +
        `${found.join(", ")}. Say which with --state DIR`,
    );
  }
  if (dir !== null) {
    if (dir !== byIds) {
      log.info(
        dir === byList
          ? `mirror state in ${dir}, the folder named by the member list as before ` +
            "(a new mirror's folder is named by its legs' export ids)"
          : `mirror state found by the legs' export ids in ${dir}`,
      );
    }
    return { dir, exportIds };
  }
  if (byIds === null) {
    const why = members.map((member, i) => {
      const answer = asked[i]!;
      return answer instanceof Error ? `${member}: ${answer.message}` : null;
    }).filter((x) => x !== null).join("; ");
    throw new DstError(
      "CONNECT",
      `No mirror state under ${mirrorStatesRoot()} is for the legs ${members.join(", ")}, ` +
        `and a new mirror needs every member, some unreachable: ${why}. A mirror's state is ` +
        "found by its legs' export ids: start their exports, or pass the --state DIR it " +
        "was made with",
    );
  }
  return { dir: byIds, exportIds };
}

/**
 * The folders under mirrorStatesRoot() whose state is for these legs, by name. A damaged
 * state counts only in one of `own` (this mirror's folders by name): there it is this
 * mirror's, and opening it says what to do.
 */
function statesFor(
  members: readonly string[],
  exportIds: readonly (string | null)[],
  own: ReadonlyArray<string | null>,
): string[] {
  const root = mirrorStatesRoot();
  let names: string[];
  try {
    names = [...Deno.readDirSync(root)]
      .filter((entry) => entry.isDirectory && entry.name.startsWith("mirror-"))
      .map((entry) => entry.name)
      .sort();
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return [];
    throw new DstError("STATE", `Cannot list the mirror states in ${root}: ${error}`, {
      cause: error,
    });
  }
  const found: string[] = [];
  for (const name of names) {
    const dir = `${root}/${name}`;
    const path = `${dir}/state.json`;
    try {
      const text = readStateFile(path);
      if (text === null) continue;
      const state = parseMirrorState(text, path);
      if (matchLegs(state.legs, members, exportIds) !== null) found.push(dir);
    } catch {
      // Unreadable or damaged: another mirror's is no concern of this one.
      if (own.includes(dir)) found.push(dir);
    }
  }
  return found;
}
