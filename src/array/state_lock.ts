/**
 * One array per state folder: an exclusive lock (flock) on `DIR/lock`, taken before
 * any leg is opened and held while the array runs. Two arrays on one state would
 * both write the legs and the bitmap, and resync under each other's writes. The
 * kernel drops the lock when the process ends, however it ends, so a crash leaves no
 * stale lock. The holder writes its pid into the file, so a second array can say
 * which process holds it.
 */

import { DstError } from "../lib/errors.ts";
import { ensureDir } from "../lib/state_file.ts";

export class StateLock {
  private constructor(readonly path: string, readonly file: Deno.FsFile) {}

  /** Locks `dir`, or throws at once (STATE_LOCKED) naming the process that holds it. */
  static take(dir: string): StateLock {
    ensureDir(dir);
    const path = `${dir}/lock`;
    let file: Deno.FsFile;
    let locked: boolean;
    try {
      file = Deno.openSync(path, { read: true, write: true, create: true, mode: 0o600 });
    } catch (error) {
      throw new DstError("STATE", `Cannot open ${path}: ${error}`, { cause: error });
    }
    try {
      locked = file.tryLockSync(true);
    } catch (error) {
      file.close();
      throw new DstError("STATE", `Cannot lock ${path}: ${error}`, { cause: error });
    }
    if (!locked) {
      const holder = holderOf(path);
      file.close();
      throw new DstError(
        "STATE_LOCKED",
        `The state folder ${dir} is in use by another dst array (${holder}): stop that one ` +
          `first, or give this one another --state`,
      );
    }
    file.truncateSync(0);
    file.writeSync(new TextEncoder().encode(`${Deno.pid}\n`));
    return new StateLock(path, file);
  }

  /** Lets go of the folder (closing the file drops the lock). */
  release(): void {
    this.file.close();
  }
}

function holderOf(path: string): string {
  try {
    const pid = Deno.readTextFileSync(path).trim();
    return /^\d+$/.test(pid) ? `process ${pid}` : "a process that is starting";
  } catch {
    return "another process";
  }
}
