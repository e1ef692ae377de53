/**
 * An export's write generation: a counter that goes up, durably, each time a new
 * connection starts writing (protocol README, "Write generation"). A mirror records
 * the generation a leg had when the mirror last wrote to it; a leg that comes back
 * with any other value was written by someone else and is never trusted.
 *
 * It lives in the exporter's own state (`--state DIR`, default
 * `$XDG_STATE_HOME/dst/exports`), keyed by the export id, never on the device: a
 * device stays nothing but the user's data.
 */

import { ensureDir, readStateFile, stateRoot, writeStateFile } from "../lib/state_file.ts";
import { DstError } from "../lib/errors.ts";

export interface WriteGeneration {
  readonly current: number;
  /** Starts a new generation and returns it once it is on stable storage. */
  next(): Promise<number>;
}

/** Where `dst export` keeps generations when no --state is given. */
export function defaultExportStateDir(): string {
  return `${stateRoot()}/exports`;
}

/** A generation kept in `DIR/<exportId>.json`. */
export class PersistedGeneration implements WriteGeneration {
  #current: number;

  private constructor(readonly path: string, current: number) {
    this.#current = current;
  }

  static open(dir: string, exportId: string): PersistedGeneration {
    ensureDir(dir);
    const path = `${dir}/${exportId}.json`;
    const text = readStateFile(path);
    if (text === null) return new PersistedGeneration(path, 0);
    let generation: unknown;
    try {
      generation = (JSON.parse(text) as { writeGeneration?: unknown }).writeGeneration;
    } catch {
      generation = undefined;
    }
    if (!Number.isSafeInteger(generation) || (generation as number) < 0) {
      throw new DstError(
        "STATE",
        `${path} is damaged (no writeGeneration): remove it only if no mirror uses this export as a leg`,
      );
    }
    return new PersistedGeneration(path, generation as number);
  }

  get current(): number {
    return this.#current;
  }

  next(): Promise<number> {
    // writeStateFile is synchronous, so calls cannot interleave: the file never goes backwards.
    const value = this.#current + 1;
    try {
      writeStateFile(this.path, JSON.stringify({ writeGeneration: value }) + "\n");
    } catch (error) {
      return Promise.reject(error);
    }
    this.#current = value;
    return Promise.resolve(value);
  }
}

/** A generation that lasts as long as the process (tests, and exports made in code). */
export class MemoryGeneration implements WriteGeneration {
  #current = 0;
  get current(): number {
    return this.#current;
  }
  next(): Promise<number> {
    return Promise.resolve(++this.#current);
  }
}
