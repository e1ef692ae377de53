/**
 * An export's write generation: a counter that goes up, durably, each time the right
 * to write is granted to a different writer than the last grant's (protocol README,
 * "Write generation"). A writer that reconnects finds the value it last got exactly
 * when nobody else wrote in between, however often it reconnected (an abandoned
 * handshake that was granted all the same changes nothing). A mirror records the
 * generation a leg had when the mirror last wrote to it; a leg that comes back with
 * any other value was written by someone else and is never trusted.
 *
 * It lives in the exporter's own state (`--state DIR`, default
 * `$XDG_STATE_HOME/dst/exports`), keyed by the export id, never on the device: a
 * device stays nothing but the user's data.
 */

import { ensureDir, readStateFile, stateRoot, writeStateFile } from "../lib/state_file.ts";
import { DstError } from "../lib/errors.ts";
import { randomId } from "../lib/hex.ts";

export interface WriteGeneration {
  readonly current: number;
  /**
   * Random, made with the state (32 hex digits): an export whose state was lost starts
   * a new epoch, so its restarted count never passes for the old one.
   */
  readonly epoch: string;
  /**
   * Grants writing to `writer` (a client identity): starts a new generation, on stable
   * storage before it resolves, unless `writer` had the last grant; returns the value.
   */
  grant(writer: string): Promise<number>;
}

/** Where `dst export` keeps generations when no --state is given. */
export function defaultExportStateDir(): string {
  return `${stateRoot()}/exports`;
}

/** A generation kept in `DIR/<exportId>.json`, with its epoch and the writer of its last grant. */
export class PersistedGeneration implements WriteGeneration {
  #current: number;
  #writer: string | null;

  private constructor(
    readonly path: string,
    readonly epoch: string,
    current: number,
    writer: string | null,
  ) {
    this.#current = current;
    this.#writer = writer;
  }

  static open(dir: string, exportId: string): PersistedGeneration {
    ensureDir(dir);
    const path = `${dir}/${exportId}.json`;
    const text = readStateFile(path);
    if (text === null) return PersistedGeneration.#create(path, 0, null);
    let state: { writeGeneration?: unknown; writer?: unknown; epoch?: unknown } = {};
    try {
      state = JSON.parse(text) ?? {};
    } catch {
      // damaged: reported below
    }
    const generation = state.writeGeneration;
    if (!Number.isSafeInteger(generation) || (generation as number) < 0) {
      throw new DstError(
        "STATE",
        `${path} is damaged (no writeGeneration): remove it only if no mirror uses this export as a leg`,
      );
    }
    // A state written before writers were recorded: the next grant starts a generation.
    const writer = typeof state.writer === "string" ? state.writer : null;
    // A state from before epochs: it gets one now, and mirrors see a new history (a full copy).
    if (typeof state.epoch !== "string" || !/^[0-9a-f]{32}$/.test(state.epoch)) {
      return PersistedGeneration.#create(path, generation as number, writer);
    }
    return new PersistedGeneration(path, state.epoch, generation as number, writer);
  }

  /** A state with a new epoch, written before it is used. */
  static #create(path: string, current: number, writer: string | null): PersistedGeneration {
    const made = new PersistedGeneration(path, randomId(), current, writer);
    made.#write(current, writer);
    return made;
  }

  #write(value: number, writer: string | null): void {
    writeStateFile(
      this.path,
      JSON.stringify({ writeGeneration: value, writer, epoch: this.epoch }) + "\n",
    );
  }

  get current(): number {
    return this.#current;
  }

  grant(writer: string): Promise<number> {
    if (writer === this.#writer) return Promise.resolve(this.#current);
    // writeStateFile is synchronous, so calls cannot interleave: the file never goes backwards.
    const value = this.#current + 1;
    try {
      this.#write(value, writer);
    } catch (error) {
      return Promise.reject(error);
    }
    this.#current = value;
    this.#writer = writer;
    return Promise.resolve(value);
  }
}

/** A generation that lasts as long as the process (tests, and exports made in code). */
export class MemoryGeneration implements WriteGeneration {
  readonly epoch = randomId();
  #current = 0;
  #writer: string | null = null;
  get current(): number {
    return this.#current;
  }
  grant(writer: string): Promise<number> {
    if (writer !== this.#writer) {
      this.#current += 1;
      this.#writer = writer;
    }
    return Promise.resolve(this.#current);
  }
}
