/**
 * Small state files that must survive a crash whole: written to a temporary name,
 * fsynced, renamed over the old one, and the folder fsynced, so a reader finds
 * either the old content or the new, never a torn mix. Synchronous on purpose: they
 * are a few hundred bytes, written rarely (a generation, a leg changing state).
 */

import * as fs from "node:fs";
import { DstError } from "./errors.ts";
import { checkPrivateFolder } from "./private_folder.ts";

/** `$XDG_STATE_HOME/dst`, else `~/.local/state/dst`: where dst keeps what it must remember. */
export function stateRoot(): string {
  const xdg = Deno.env.get("XDG_STATE_HOME");
  if (xdg) return `${xdg}/dst`;
  const home = Deno.env.get("HOME");
  if (!home) {
    throw new DstError(
      "STATE",
      "Neither XDG_STATE_HOME nor HOME is set: say where to keep state with --state DIR",
    );
  }
  return `${home}/.local/state/dst`;
}

/**
 * Creates `dir` (and parents) with mode 0700; a clear error when it cannot, or when it
 * is a folder others can write (they could plant a link where dst writes).
 */
export function ensureDir(dir: string): void {
  try {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  } catch (error) {
    throw new DstError("STATE", `Cannot create the state folder ${dir}: ${error}`, {
      cause: error,
    });
  }
  checkPrivateFolder(dir, { what: "state folder", forbidden: 0o022, followLink: true }, "STATE");
}

/** The file's text, or null when it does not exist. */
export function readStateFile(path: string): string | null {
  try {
    return fs.readFileSync(path, "utf8");
  } catch (error) {
    if ((error as { code?: string }).code === "ENOENT") return null;
    throw new DstError("STATE", `Cannot read ${path}: ${error}`, { cause: error });
  }
}

/** Replaces `path` with `text` atomically and durably. */
export function writeStateFile(path: string, text: string): void {
  const temporary = `${path}.tmp`;
  const dir = path.slice(0, Math.max(path.lastIndexOf("/"), 0)) || ".";
  try {
    // Exclusively: a link planted at the temporary name is removed, never written through.
    fs.rmSync(temporary, { force: true });
    const fd = fs.openSync(temporary, "wx", 0o600);
    try {
      fs.writeFileSync(fd, text);
      fs.fdatasyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(temporary, path);
    syncDir(dir);
  } catch (error) {
    throw new DstError("STATE", `Cannot write ${path}: ${error}`, { cause: error });
  }
}

/** Makes a rename or a new file in `dir` durable. */
function syncDir(dir: string): void {
  const fd = fs.openSync(dir, "r");
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}
