/**
 * Folders dst keeps state or sockets in must be this user's own: a folder others can
 * write lets them plant a symlink where dst is about to write (and dst would write
 * through it), or replace a file between two of dst's steps.
 */

import { DstError } from "./errors.ts";

export interface FolderRule {
  /** Named in the message: "state folder", "socket folder". */
  what: string;
  /** Mode bits others may not have: 0o022 (no one else writes), 0o077 (no one else at all). */
  forbidden: number;
  /** Whether the folder may be a symlink (its target is checked then). */
  followLink: boolean;
}

/** Throws (code `code`) unless `dir` is a folder this user owns, closed to others as `rule` says. */
export function checkPrivateFolder(dir: string, rule: FolderRule, code: string): void {
  const stat = rule.followLink ? Deno.statSync(dir) : Deno.lstatSync(dir);
  if (stat.isSymlink) {
    throw new DstError(code, `The ${rule.what} ${dir} is a symlink: give a real folder`);
  }
  if (!stat.isDirectory) throw new DstError(code, `The ${rule.what} ${dir} is not a folder`);
  const uid = Deno.uid();
  // Platforms without owners or modes (Windows) report null: nothing to check there.
  if (uid !== null && stat.uid !== null && stat.uid !== uid) {
    throw new DstError(
      code,
      `The ${rule.what} ${dir} belongs to user ${stat.uid}, not to you (${uid}): use a folder of ` +
        "your own",
    );
  }
  const mode = stat.mode === null ? 0 : stat.mode & 0o777;
  if ((mode & rule.forbidden) !== 0) {
    throw new DstError(
      code,
      `The ${rule.what} ${dir} is open to others (mode ${mode.toString(8).padStart(4, "0")}): ` +
        `run chmod 700 ${dir}`,
    );
  }
}
